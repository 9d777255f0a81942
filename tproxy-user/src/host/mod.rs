//! The host around us: privileges and limits ([`system`]), what its kernel
//! can do ([`kernel`]), its socket table ([`sock_diag`]), its cgroups
//! ([`cgroup`]), rtnetlink connections (`netlink`), and the `doctor` that
//! reports on them.

pub mod cgroup;
pub mod doctor;
pub mod files;
pub mod kernel;
pub(crate) mod netlink;
pub mod sock_diag;
pub mod system;
