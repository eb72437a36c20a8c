//! The `vmm` command: parse the command line, run the VM, report errors on
//! one line, exit with the VM's status.

use clap::Parser;
use clap::error::ErrorKind;
use std::io::Write;
use std::time::Instant;
use vmm::{Args, VmConfig, error_chain};

/// clap's first paragraph (before the usage), on one line.
fn one_line(text: &str) -> String {
    let para: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = para.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

fn main() {
    let start = Instant::now();
    // Before any other thread exists, so all of them inherit the mask and
    // termination signals reach the control loop's signalfd.
    if let Err(e) = vmm::block_termination() {
        vmm::logger::stderr_line(format_args!("vmm: cannot block termination signals: {e}"));
        std::process::exit(1);
    }
    vmm::logger::init();
    // `vmm --host-kind` alone: what kind of KVM this host has (docs/hosts.md).
    if std::env::args_os().skip(1).eq(["--host-kind"]) {
        let _ = writeln!(std::io::stdout(), "{}", vmm::HostKind::detect().name());
        std::process::exit(0);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // `vmm --help | head -1`: a closed stdout is not an error.
                let _ = write!(std::io::stdout(), "{e}");
                std::process::exit(0);
            }
            _ => {
                vmm::logger::stderr_line(format_args!(
                    "vmm: {} (see vmm --help)",
                    one_line(&e.to_string())
                ));
                std::process::exit(2);
            }
        },
    };
    let config = match VmConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            vmm::logger::stderr_line(format_args!("vmm: {}", error_chain(&e)));
            std::process::exit(2);
        }
    };
    match vmm::run(config, start) {
        Ok(status) => std::process::exit(status),
        Err(e) => {
            vmm::logger::stderr_line(format_args!("vmm: {}", error_chain(&e)));
            std::process::exit(1);
        }
    }
}
