//! The host around us: privileges and limits ([`system`]), what its kernel
//! can do ([`kernel`]), its socket table ([`sock_diag`]), its cgroups
//! ([`cgroup`]) and rtnetlink connections (`netlink`); [`crate::doctor`]
//! reports on them.

pub mod cgroup;
pub mod files;
pub mod kernel;
pub(crate) mod netlink;
pub mod sock_diag;
pub mod system;
