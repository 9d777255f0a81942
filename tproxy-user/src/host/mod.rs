//! The host around us: privileges and limits ([`system`]), what its kernel
//! can do ([`kernel`]), and the `doctor` that reports on both.

pub mod doctor;
pub mod kernel;
pub mod system;
