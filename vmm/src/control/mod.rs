//! The control thread: after set-up, the process's main thread runs one
//! event loop for everything that is not a vCPU: console input and output,
//! QMP clients, the virtio-mem queue, termination signals, requests to end
//! the VM and fatal vCPU errors; what QMP commands do to the VM is carried
//! out here too.
//!
//! * [`event_loop`]: the event loop ([`event_loop::ControlLoop`]), why the
//!   VM stopped ([`event_loop::StopReason`]), and the console and lifecycle
//!   event sources.
//! * [`vm_controller`]: the control side's [`VmOps`](crate::qmp::VmOps):
//!   where a QMP command, once parsed by `qmp`, acts on the VM.
//! * [`console`]: the serial console on the terminal (stdin to COM1, raw
//!   mode, QEMU's Ctrl-A escape).
//! * [`console_output`]: the bounded buffer vCPUs append guest console
//!   output to and the control thread drains.
//! * [`stdout_writer`]: writing that output to stdout without ever blocking
//!   the control thread.
//! * [`signals`]: termination signals, delivered to the loop through a
//!   signalfd.

pub(crate) mod console;
pub(crate) mod console_output;
pub(crate) mod event_loop;
pub(crate) mod signals;
pub(crate) mod stdout_writer;
pub(crate) mod vm_controller;
