//! probe: checks at startup, with the raw `io-uring` crate, that this kernel and sandbox give us a
//! working io_uring with every opcode ringbroker issues, so that an unusable environment stops the
//! process with a message naming the cause instead of failing on the first request.

use std::io;

use io_uring::{IoUring, Probe, opcode};

/// Why io_uring cannot be used here. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "io_uring is disabled by the kernel.io_uring_disabled sysctl (value {value}); \
         set it to 0 (sysctl -w kernel.io_uring_disabled=0) to run ringbroker"
    )]
    DisabledBySysctl { value: u32 },
    #[error(
        "io_uring_setup is refused ({source}); a seccomp profile (e.g. a container runtime's default) \
         or the io_uring_group sysctl blocks io_uring: allow the io_uring_* syscalls"
    )]
    Forbidden { source: io::Error },
    #[error("this kernel has no io_uring ({source}); ringbroker needs Linux 5.19 or newer")]
    NotImplemented { source: io::Error },
    #[error("cannot create an io_uring ({source}); check RLIMIT_MEMLOCK and the open file limit")]
    Setup { source: io::Error },
    #[error("cannot read the supported io_uring opcodes: {source}")]
    ProbeFailed { source: io::Error },
    #[error("this kernel's io_uring lacks opcodes ringbroker needs: {missing}; upgrade the kernel")]
    MissingOpcodes { missing: String },
}

/// The opcodes ringbroker issues, through compio or directly, with their names for messages.
pub const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Splice::CODE, "SPLICE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::OpenAt::CODE, "OPENAT"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::Statx::CODE, "STATX"),
    (opcode::Connect::CODE, "CONNECT"),
];

/// Runs every check: the sysctl, ring creation, the opcode table.
pub fn probe_io_uring() -> Result<(), ProbeError> {
    if let Some(value) = read_disabled_sysctl()
        && value == 2
    {
        return Err(ProbeError::DisabledBySysctl { value });
    }
    // With io_uring_disabled = 1 only members of kernel.io_uring_group may create rings; the
    // creation attempt below tells whether we are one of them.
    let ring = IoUring::new(8).map_err(classify_setup_error)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|source| ProbeError::ProbeFailed { source })?;
    missing_opcodes(|code| probe.is_supported(code))
}

/// Checks the opcode table through `is_supported`; split out so the message can be tested.
pub fn missing_opcodes(is_supported: impl Fn(u8) -> bool) -> Result<(), ProbeError> {
    let missing: Vec<&str> = REQUIRED_OPCODES
        .iter()
        .filter(|(code, _)| !is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ProbeError::MissingOpcodes {
            missing: missing.join(", "),
        })
    }
}

fn read_disabled_sysctl() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

fn classify_setup_error(source: io::Error) -> ProbeError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            match read_disabled_sysctl() {
                // Not in io_uring_group while the sysctl restricts ring creation to it.
                Some(value @ 1..) => ProbeError::DisabledBySysctl { value },
                _ => ProbeError::Forbidden { source },
            }
        }
        Some(libc::ENOSYS) => ProbeError::NotImplemented { source },
        _ => ProbeError::Setup { source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_passes_the_probe() {
        probe_io_uring().expect("io_uring is usable on the build machine");
    }

    #[test]
    fn missing_opcodes_are_named() {
        let err = missing_opcodes(|code| code != opcode::Splice::CODE).unwrap_err();
        assert!(err.to_string().contains("SPLICE"), "{err}");
    }

    #[test]
    fn setup_errors_name_the_cause() {
        let enosys = classify_setup_error(io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(matches!(enosys, ProbeError::NotImplemented { .. }));
        let enomem = classify_setup_error(io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(enomem.to_string().contains("RLIMIT_MEMLOCK"));
    }
}
