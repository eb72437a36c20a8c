//! The assembled VM: built from a [`VmConfig`], run until it ends, and
//! taken down in order.

use crate::cli::config::{OnReset, VmConfig};
use crate::cli::kernel_cmdline::appended_args;
use crate::control::console::{ConsoleInput, RawTerminal};
use crate::control::event_loop::{
    Console, ControlError, ControlLoop, Lifecycle, StopReason, StopSlot,
};
use crate::control::signals::SignalFd;
use crate::control::stdout_writer::{ConsoleDrain, FINAL_FLUSH, StdoutWriter};
use crate::control::vm_controller::VmController;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::kvm::dev_kvm::{self, KvmError};
use crate::kvm::host::HostKind;
use crate::kvm::kick::{self, KickError};
use crate::kvm::vcpu::{ANSWER_DEADLINE, FatalErrors, Marks, VcpuContext, VcpuError, VcpuHandle};
use crate::kvm::vcpu_state::{VcpuState, VcpuStateError};
use crate::kvm::vm::{Vm, VmError};
use crate::memory::guest_memory::{self, GuestMemoryError, MEMORY_MAP_LABEL, SharedGuestMap};
use crate::memory::hotplug_device::{Hotplug, HotplugPlacement, HotplugWorker};
use crate::power_on::{PowerOnError, PowerOnImage};
use crate::qmp::{QmpEvent, QmpServer, ShutdownCause};
use crate::report::rcu_lifetime::LifetimeRecorder;
use boot::BootInfo;
use rcu::RcuCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use thiserror::Error;

/// Errors building or running the VM. Each names the step that failed; the
/// cause is the `source`.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The call_rcu thread's strategy could not be set.
    #[error("cannot select the RCU wake-up strategy")]
    RcuStrategy(#[source] rcu::AlreadyStarted),
    /// KVM is unusable.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The memory configuration is invalid.
    #[error("invalid memory configuration")]
    RamLayout(#[source] boot::ram_layout::RamLayoutError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    GuestMemory(#[from] GuestMemoryError),
    /// Devices could not be created.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
    /// The MP table could not be built.
    #[error("cannot build the MP table")]
    Mptable(#[source] boot::mptable::MptableError),
    /// The kernel command line is invalid.
    #[error(transparent)]
    Cmdline(#[from] boot::cmdline::CmdlineError),
    /// The kernel, initrd or boot parameters could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The supported CPUID could not be read.
    #[error("cannot read the CPUID KVM supports")]
    Cpuid(#[source] boot::cpu::cpuid::CpuidError),
    /// A vCPU could not be created.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// Which.
        index: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU could not be set up.
    #[error(transparent)]
    VcpuSetup(#[from] boot::VcpuSetupError),
    /// The boot vCPU's entry registers could not be set.
    #[error("cannot set the boot vCPU's entry registers")]
    Regs(#[source] boot::cpu::regs::RegsError),
    /// A vCPU thread could not start.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The kick handler could not be installed.
    #[error(transparent)]
    Kick(#[from] KickError),
    /// The signal descriptor could not be created.
    #[error("cannot watch termination signals")]
    Signals(#[source] std::io::Error),
    /// Fatal errors list could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The control loop failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The hot-plug device could not be created.
    #[error(transparent)]
    Hotplug(#[from] crate::memory::hotplug_device::HotplugSetupError),
    /// The QMP socket could not be served.
    #[error("cannot serve QMP")]
    Qmp(#[source] crate::qmp::ServerError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The power-on image (for `--on-reset restart`) could not be taken.
    #[error("cannot keep the power-on state of the machine")]
    PowerOn(#[source] PowerOnError),
    /// A vCPU's power-on state (for `--on-reset restart`) could not be read.
    #[error("cannot keep the power-on state of vCPU {index}")]
    VcpuState {
        /// Which.
        index: u32,
        /// Why.
        #[source]
        source: VcpuStateError,
    },
    /// KVM's MSR list (for `--on-reset restart`) could not be read.
    #[error("cannot read the MSR list KVM supports")]
    MsrList(#[source] kvm_ioctls::Error),
}

/// A VM ready to run.
pub struct Machine {
    spec: HardwareSpec,
    host: HostKind,
    map: boot::RamLayout,
    /// The VM (kept alive for the memory slots and vCPUs).
    pub vm: Arc<Vm>,
    /// The RCU-published guest memory map.
    pub memory: SharedGuestMap,
    /// Devices and buses.
    pub devices: DeviceManager,
    /// The virtio-mem devices, one per `--hotplug-memory`, in order.
    pub hotplug: Vec<Arc<Hotplug>>,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    vcpus: Arc<OnceLock<Arc<[VcpuHandle]>>>,
    fatal: Arc<FatalErrors>,
    marks: Arc<Marks>,
    boot: Option<BootInfo>,
    /// The kernel command line as given to the guest.
    pub cmdline: String,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("host", &self.host)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// How a run ended, with what the reports need.
#[derive(Debug)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: StopReason,
    /// Per-vCPU exit counters.
    pub vcpu_stats: Vec<Arc<crate::kvm::vcpu::VcpuStats>>,
    /// The RCU lifetime recorder (end marked).
    pub lifetime: Arc<Mutex<LifetimeRecorder>>,
    /// vCPUs whose threads did not exit within [`ANSWER_DEADLINE`] (left
    /// behind, possibly inside an RCU read section: wait for no grace
    /// period and unmap no guest memory after this).
    pub stuck_vcpus: Vec<u32>,
    /// Guest console output written (accepted into the console buffer).
    pub console_bytes: u64,
    /// Guest console output lost: the buffer was full (stdout did not keep
    /// up), stdout failed, or it did not take the rest by the end.
    pub console_bytes_dropped: u64,
}

/// What a change of a hot-plug device's plugged size does (log, lifetime
/// record, QMP event); called on the control thread.
type SizeChanged = Arc<dyn Fn(u64) + Send + Sync>;

/// What [`Machine::run`] sets up around the control loop, and takes down
/// at the end.
struct Session {
    control: ControlLoop,
    /// Why the VM should stop, filled by the loop's subscribers.
    stop: StopSlot,
    /// The terminal in raw mode while the console runs (restored on drop).
    raw: Option<RawTerminal>,
    drain: Arc<Mutex<ConsoleDrain>>,
    lifetime: Arc<Mutex<LifetimeRecorder>>,
    /// Set while a QMP client has the VM paused (`stop`): a reset keeps it
    /// paused, as QEMU does.
    user_paused: Arc<std::sync::atomic::AtomicBool>,
    qmp: Option<Arc<Mutex<QmpServer>>>,
    /// One per virtio-mem device, in the order of `Machine::hotplug`.
    size_changed: Vec<SizeChanged>,
}

/// The hardware of a VM, without anything to boot.
#[derive(Debug, Clone)]
pub struct HardwareSpec {
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The virtio-mem devices, in order (their regions follow each other
    /// above RAM).
    pub hotplug: Vec<crate::cli::config::HotplugDeviceConfig>,
}

/// How [`Machine::run`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Connect stdin to the serial console.
    pub console: bool,
    /// Stop the VM after this long (tests); `None` runs until it ends.
    pub timeout: Option<std::time::Duration>,
    /// Serve QMP on a unix socket at this path.
    pub qmp: Option<std::path::PathBuf>,
    /// Which threads run under their seccomp filters.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Where guest console output goes: this descriptor (duplicated or
    /// reopened when the run starts; the caller keeps it open until then),
    /// or stdout if `None`.
    pub console_out: Option<std::os::fd::RawFd>,
    /// What a guest reset and QMP `system_reset` do: end the run (the
    /// default) or reboot the guest in place and carry on.
    pub on_reset: OnReset,
}

impl Machine {
    /// Creates the VM with its RAM, devices and vCPUs (CPUID, MSRs, FPU and
    /// LAPIC set up; no entry state): the hardware, with nothing loaded.
    /// [`load_linux`](Self::load_linux) then boots a kernel; tests may
    /// instead write their own code and set the boot vCPU's registers.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn create(spec: HardwareSpec, start: Instant) -> Result<Self, MachineError> {
        Self::create_and_load(spec, start, None)
    }

    /// Builds the VM `config` describes and loads its kernel: the whole
    /// set-up before the first `KVM_RUN`.
    pub fn build(config: &VmConfig, start: Instant) -> Result<Self, MachineError> {
        rcu::set_wakeup_strategy(config.rcu_wakeup).map_err(MachineError::RcuStrategy)?;
        Self::create_and_load(
            HardwareSpec {
                cpus: config.cpus,
                memory: config.memory,
                hotplug: config.hotplug.clone(),
            },
            start,
            Some(config),
        )
    }

    /// `create`, then [`load_linux`](Self::load_linux) if
    /// `config` is given. KVM can take milliseconds to add a large memory
    /// slot, and nothing before the first `KVM_RUN` needs the slots: guest
    /// RAM is registered on a helper thread while this one creates the
    /// devices and vCPUs and loads the kernel into the same memory. Both
    /// are done when this returns.
    fn create_and_load(
        spec: HardwareSpec,
        start: Instant,
        config: Option<&VmConfig>,
    ) -> Result<Self, MachineError> {
        let host = HostKind::detect();
        let kvm = dev_kvm::open(spec.cpus)?;
        let vm = Arc::new(Vm::new(kvm)?);
        let sizes: Vec<u64> = spec.hotplug.iter().map(|d| d.size).collect();
        let map =
            boot::RamLayout::with_hotplug(spec.memory, &sizes).map_err(MachineError::RamLayout)?;
        let phys_bits = boot::cpu::cpuid::supported_cpuid(vm.kvm())
            .map(|c| boot::cpu::cpuid::phys_addr_bits(c.as_slice()))
            .map_err(MachineError::Cpuid)?;
        crate::memory::hotplug_device::check_regions(
            map.hotplug_regions(),
            vm.memslot_limit() as u64,
            phys_bits,
        )?;
        let (mem, ram) = guest_memory::map_ram(&map.mmap_ranges())?;
        // Dropped after the helper is joined, whatever happens here, so the
        // slots never point at memory that was unmapped.
        let registered_mem = mem.clone();
        std::thread::scope(|scope| {
            let register = || guest_memory::register_ram(&vm, &registered_mem);
            let helper = std::thread::Builder::new()
                .name("vmm-memslots".into())
                .spawn_scoped(scope, register);
            // No thread to spare: register here, before anything else.
            let inline = helper.is_err().then(register);
            let machine =
                Self::assemble(spec, start, host, map, &vm, mem, ram).and_then(|mut m| {
                    if let Some(config) = config {
                        m.load_linux(config)?;
                    }
                    Ok(m)
                });
            let registered = match helper {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => inline.unwrap_or_else(register),
            };
            registered?;
            machine
        })
    }

    /// The VM's devices and vCPUs around `mem` (CPUID, MSRs, FPU and LAPIC
    /// set up; nothing loaded). Does not need `mem` registered with KVM.
    fn assemble(
        spec: HardwareSpec,
        start: Instant,
        host: HostKind,
        map: boot::RamLayout,
        vm: &Arc<Vm>,
        mem: vm_memory::GuestMemoryMmap,
        ram: guest_memory::AlignedRam,
    ) -> Result<Self, MachineError> {
        let vm = Arc::clone(vm);
        let devices = DeviceManager::new(&vm)?;

        let mut cpuid = boot::cpu::cpuid::supported_cpuid(vm.kvm()).map_err(MachineError::Cpuid)?;
        if host == HostKind::EmulationOnly {
            // Software-nested KVM (PVM) leaves an AP stuck in the PV
            // send-IPI hypercall; plain IPIs through the LAPIC work.
            boot::cpu::cpuid::clear_kvm_features(
                &mut cpuid,
                boot::cpu::cpuid::KVM_FEATURE_PV_SEND_IPI,
            );
        }
        let memory: SharedGuestMap = Arc::new(RcuCell::with_label(
            guest_memory::GuestMap::first(mem, ram),
            MEMORY_MAP_LABEL,
        ));
        let numa = spec.hotplug.iter().any(|d| d.node.is_some());
        let mut hotplug = Vec::with_capacity(spec.hotplug.len());
        let mut first_kvm_slot = crate::memory::memory_manager::FIRST_HOTPLUG_KVM_SLOT;
        for ((index, d), r) in (0u32..).zip(&spec.hotplug).zip(map.hotplug_regions()) {
            hotplug.push(Arc::new(Hotplug::new(
                &vm,
                &memory,
                &devices,
                HotplugPlacement {
                    index,
                    id: d.id.clone(),
                    base: r.start,
                    size: r.size,
                    backing: d.backing,
                    node: numa.then_some(d.node.unwrap_or(0)),
                    first_kvm_slot,
                },
            )?));
            // Fits u32: check_regions bounded the slots by KVM's limit.
            first_kvm_slot += (r.size / crate::memory::memory_manager::SLOT_SIZE) as u32;
        }
        let fatal = Arc::new(FatalErrors::new().map_err(MachineError::EventFd)?);
        for h in &hotplug {
            let fatal = Arc::clone(&fatal);
            h.manager.on_fatal(Box::new(move |msg| fatal.report(msg)));
        }
        let mut vcpu_fds = Vec::with_capacity(spec.cpus as usize);
        for index in 0..spec.cpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|source| MachineError::CreateVcpu { index, source })?;
            let g = rcu::read_lock();
            boot::configure_vcpu(
                &fd,
                memory.read(&g).memory(),
                &cpuid,
                index,
                spec.cpus,
                None,
            )?;
            drop(g);
            vcpu_fds.push(fd);
        }
        Ok(Self {
            spec,
            host,
            map,
            vm,
            memory,
            devices,
            hotplug,
            vcpu_fds,
            vcpus: Arc::new(OnceLock::new()),
            fatal,
            marks: Arc::new(Marks::new(start)),
            boot: None,
            cmdline: String::new(),
        })
    }

    /// Writes the ACPI tables, loads the kernel, initrd and command line of
    /// `config`, and puts the boot vCPU at the kernel's entry.
    pub fn load_linux(&mut self, config: &VmConfig) -> Result<(), MachineError> {
        let g = rcu::read_lock();
        let mem = self.memory.read(&g).memory();
        let mut acpi = self.devices.acpi_config(self.spec.cpus);
        for h in &self.hotplug {
            acpi.virtio_mmio.push(h.acpi());
        }
        if self.spec.hotplug.iter().any(|d| d.node.is_some()) {
            acpi.numa = Some(boot::acpi::NumaAcpi {
                ram: self.map.ram_ranges().to_vec(),
                hotplug: self
                    .hotplug
                    .iter()
                    .map(|h| {
                        let i = h.vmem.info();
                        let r = boot::address_plan::GuestRange {
                            start: i.addr,
                            size: i.region_size,
                        };
                        (r, u32::from(i.node_id))
                    })
                    .collect(),
            });
        }
        let rsdp = boot::acpi::create_acpi_tables(mem, &acpi).map_err(MachineError::Acpi)?;
        boot::mptable::write_mptable(mem, self.spec.cpus).map_err(MachineError::Mptable)?;
        let appended = appended_args(&config.cmdline, self.host, !self.hotplug.is_empty());
        let cmdline = boot::cmdline::build_cmdline(&config.cmdline, &appended)?;
        let boot = boot::load_kernel(
            mem,
            &boot::BootConfig {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                memory: &self.map,
                rsdp: Some(rsdp),
            },
        )?;
        let bsp = self.vcpu_fds.first().ok_or(MachineError::CreateVcpu {
            index: 0,
            source: kvm_ioctls::Error::new(libc::ENODEV),
        })?;
        match boot.protocol {
            boot::BootProtocol::Linux64 => {
                boot::cpu::regs::setup_linux64(mem, bsp, boot.entry, boot.boot_params)
            }
            boot::BootProtocol::Pvh => {
                boot::cpu::regs::setup_pvh(mem, bsp, boot.entry, boot.boot_params)
            }
        }
        .map_err(MachineError::Regs)?;
        let bytes = boot::cmdline::cmdline_bytes(&cmdline)?;
        self.cmdline = String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string();
        self.boot = Some(boot);
        Ok(())
    }

    /// The vCPU file descriptors, before [`run`](Self::run) hands them to
    /// their threads (tests set registers through them).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn vcpu_fds(&self) -> &[kvm_ioctls::VcpuFd] {
        &self.vcpu_fds
    }

    /// The host kind detected at build time.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// Time marks (start, first `KVM_RUN`).
    pub fn marks(&self) -> &Arc<Marks> {
        &self.marks
    }

    /// Starts the vCPUs and runs the control loop until the VM ends; stops
    /// every vCPU before returning.
    ///
    /// In order: the control loop and its subscribers, the RCU lifetime
    /// record, the QMP server, the virtio-mem workers, the vCPUs, the loop
    /// itself with its reboots in place, and the teardown (one private
    /// method each).
    pub fn run(&mut self, options: RunOptions) -> Result<RunOutcome, MachineError> {
        let mut session = self.control_loop(&options)?;
        // The control thread reads the memory map (virtio-mem requests, QMP)
        // and must not make grace periods interrupt the vCPUs either.
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        self.record_lifetime(&mut session);
        self.start_qmp(&options, &mut session)?;
        self.add_hotplug_workers(&mut session);
        let (vcpus, image) = self.start_vcpus(&options)?;
        let result = self.run_until_end(&mut session, &vcpus, image.as_ref());
        Ok(self.finish(session, &vcpus, result)?)
    }

    /// The control loop with what every run has: guest power-off, reset and
    /// fatal errors and signals ([`Lifecycle`]), the console (if asked),
    /// the drain of guest console output to stdout, and the time limit.
    fn control_loop(&self, options: &RunOptions) -> Result<Session, MachineError> {
        let stop: StopSlot = Arc::new(Mutex::new(None));
        let signals = SignalFd::new().map_err(MachineError::Signals)?;
        let mut control = ControlLoop::new(Arc::clone(&stop))?;
        control.add(Arc::new(Mutex::new(Lifecycle::new(
            Arc::clone(&self.devices.exit),
            Arc::clone(&self.fatal),
            signals,
            Arc::clone(&stop),
        ))));
        let raw = if options.console {
            let raw = RawTerminal::stdin();
            control.add(Arc::new(Mutex::new(Console::new(
                ConsoleInput::new(Arc::clone(&self.devices.serial), raw.is_some()),
                self.devices
                    .serial_drained
                    .try_clone()
                    .map_err(MachineError::EventFd)?,
                Arc::clone(&stop),
            ))));
            raw
        } else {
            None
        };
        if let Some(t) = options.timeout {
            control.set_deadline(Instant::now() + t);
        }
        let writer = match StdoutWriter::new(options.console_out.unwrap_or(libc::STDOUT_FILENO)) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("no usable stdout ({e}): guest console output is dropped");
                None
            }
        };
        let drain = Arc::new(Mutex::new(ConsoleDrain::new(
            Arc::clone(&self.devices.console_output),
            writer,
        )));
        control.add(drain.clone());
        Ok(Session {
            control,
            stop,
            raw,
            drain,
            lifetime: Arc::new(Mutex::new(LifetimeRecorder::new(self.marks.start))),
            user_paused: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            qmp: None,
            size_changed: Vec::new(),
        })
    }

    /// The RCU lifetime: sampled by the loop's tick, marked at boot (the
    /// first `KVM_RUN`), at plugs and unplugs, and at the end.
    fn record_lifetime(&self, session: &mut Session) {
        let (rec, marks) = (Arc::clone(&session.lifetime), Arc::clone(&self.marks));
        let mut booted = false;
        session.control.set_tick(Box::new(move |now| {
            let mut r = lock(&rec);
            if !booted {
                let ns = marks
                    .first_run_ns
                    .load(std::sync::atomic::Ordering::Relaxed);
                if ns != 0 {
                    booted = true;
                    r.mark_boot(marks.start + std::time::Duration::from_nanos(ns));
                }
            }
            r.maybe_sample(now);
            let next = r.next_sample_in(now);
            if booted {
                next
            } else {
                next.min(std::time::Duration::from_millis(10))
            }
        }));
    }

    /// The QMP server, if asked: it listens before the guest runs, as with
    /// QEMU.
    fn start_qmp(&self, options: &RunOptions, session: &mut Session) -> Result<(), MachineError> {
        let Some(path) = &options.qmp else {
            return Ok(());
        };
        let rec = Arc::clone(&session.lifetime);
        let ops = VmController::new(
            Arc::clone(&self.vcpus),
            Arc::clone(&self.devices.ged),
            Arc::clone(&session.stop),
            self.hotplug.clone(),
            self.spec.memory,
            Box::new(move || {
                serde_json::to_value(lock(&rec).report(Instant::now())).unwrap_or_default()
            }),
        )
        .with_reset(options.on_reset, Arc::clone(&session.user_paused));
        let server = Arc::new(Mutex::new(
            QmpServer::new(path, Box::new(ops)).map_err(MachineError::Qmp)?,
        ));
        session.control.add(server.clone());
        session.qmp = Some(server);
        Ok(())
    }

    /// One worker per virtio-mem device on the control loop, with what a
    /// change of its plugged size does (by the guest's requests or by a
    /// reset that unplugs everything): a log line, the lifetime plot's
    /// plugged size of all devices together, and the QMP events.
    fn add_hotplug_workers(&self, session: &mut Session) {
        let events = session.qmp.as_ref().map(|q| lock(q).event_sender());
        let all_vmem: Arc<[Arc<devices::virtio::VirtioMem>]> =
            self.hotplug.iter().map(|h| Arc::clone(&h.vmem)).collect();
        session.size_changed = self
            .hotplug
            .iter()
            .map(|h| {
                let all_vmem = Arc::clone(&all_vmem);
                let events = events.clone().map(Mutex::new);
                let rec = Arc::clone(&session.lifetime);
                let id = h.id.clone();
                Arc::new(move |size| {
                    log::info!("virtio-mem {id}: plugged size now {size:#x}");
                    let total = all_vmem.iter().map(|v| v.plugged_size()).sum();
                    lock(&rec).plugged_size(Instant::now(), total);
                    if let Some(e) = &events {
                        lock(e).send(QmpEvent::MemoryDeviceSizeChange {
                            id: id.clone(),
                            size,
                        });
                    }
                }) as SizeChanged
            })
            .collect();
        for (h, changed) in self.hotplug.iter().zip(&session.size_changed) {
            let changed = Arc::clone(changed);
            let resize_events = events.clone();
            let vmem = Arc::clone(&h.vmem);
            let resize_id = h.id.clone();
            session.control.add(Arc::new(Mutex::new(
                HotplugWorker::new(
                    Arc::clone(h),
                    Arc::clone(&self.memory),
                    Box::new(move |size| changed(size)),
                )
                .on_resize(Box::new(move |report| {
                    if let Some(e) = &resize_events {
                        e.send(crate::memory::hotplug_device::resize_event(
                            &resize_id,
                            report,
                            vmem.stall_timeout(),
                        ));
                    }
                })),
            )));
        }
    }

    /// Takes the power-on state (with `--on-reset restart`), prepares the
    /// seccomp filters, starts one thread per vCPU and filters the control
    /// thread. Returns the vCPUs and the power-on image resets go back to.
    fn start_vcpus(
        &mut self,
        options: &RunOptions,
    ) -> Result<(Arc<[VcpuHandle]>, Option<PowerOnImage>), MachineError> {
        // With `--on-reset restart`, the state a reset goes back to: taken
        // now, everything loaded, before any vCPU ran (and before any
        // filter: it reads KVM's MSR list).
        let power_on = match options.on_reset {
            OnReset::Exit => None,
            OnReset::Restart => Some(self.capture_power_on()?),
        };
        let (image, mut vcpu_states) = match power_on {
            Some((image, states)) => (Some(image), states.into_iter().map(Some).collect()),
            None => (None, Vec::new()),
        };
        kick::install_handler()?;
        let needs = crate::seccomp::FilterNeeds {
            memfd_backing: self
                .spec
                .hotplug
                .iter()
                .any(|d| d.backing.backend() == crate::memory::memory_backing::Backend::Memfd),
        };
        let filters = crate::seccomp::RunFilters::prepare(options.seccomp, needs)?;
        if options.seccomp != crate::seccomp::SeccompMode::Off {
            install_filtered_panic_hook();
        }
        let ctx = VcpuContext {
            pio: Arc::clone(&self.devices.pio),
            mmio: Arc::clone(&self.devices.mmio),
            memory: Arc::clone(&self.memory),
            exit: Arc::clone(&self.devices.exit),
            fatal: Arc::clone(&self.fatal),
            marks: Arc::clone(&self.marks),
            seccomp: filters.vcpu.clone(),
        };
        let mut handles = Vec::with_capacity(self.vcpu_fds.len());
        for (index, fd) in (0u32..).zip(self.vcpu_fds.drain(..)) {
            let state = vcpu_states.get_mut(index as usize).and_then(Option::take);
            handles.push(VcpuHandle::spawn(index, fd, ctx.clone(), state)?);
        }
        let vcpus: Arc<[VcpuHandle]> = handles.into();
        if let Err(e) = filters.enter_control() {
            if let Err(stuck) = crate::kvm::vcpu::stop_all(&vcpus, ANSWER_DEADLINE) {
                log::error!("{stuck}");
            }
            return Err(e.into());
        }
        let _ = self.vcpus.set(Arc::clone(&vcpus));
        Ok((vcpus, image))
    }

    /// Runs the control loop until the VM ends; a reset with a power-on
    /// `image` (`--on-reset restart`) reboots the machine in place, sends
    /// QMP's `RESET` and runs the loop again.
    fn run_until_end(
        &self,
        session: &mut Session,
        vcpus: &Arc<[VcpuHandle]>,
        image: Option<&PowerOnImage>,
    ) -> Result<StopReason, ControlError> {
        loop {
            let result = session.control.run();
            let cause = match (&result, image) {
                (Ok(StopReason::Guest(devices::ExitRequest::Reset)), Some(_)) => {
                    ShutdownCause::GuestReset
                }
                (
                    Ok(StopReason::Qmp(crate::control::event_loop::QmpStop::SystemReset)),
                    Some(_),
                ) => ShutdownCause::HostQmpSystemReset,
                _ => return result,
            };
            let Some(image) = image else {
                return result;
            };
            let keep_paused = session
                .user_paused
                .load(std::sync::atomic::Ordering::Acquire);
            if let Err(msg) = self.reboot(vcpus, image, keep_paused, &session.size_changed) {
                return Ok(StopReason::Fatal(format!(
                    "cannot reset the machine: {msg}"
                )));
            }
            *lock(&session.stop) = None;
            lock(&session.lifetime).mark(
                Instant::now(),
                crate::report::rcu_lifetime::MarkerKind::Boot,
                format!("reboot in place ({})", cause.as_str()),
            );
            log::info!("machine reset ({})", cause.as_str());
            if let Some(q) = &session.qmp {
                lock(q).event_sender().send(QmpEvent::Reset(cause));
            }
        }
    }

    /// Stops every vCPU (naming those left behind), writes out the console
    /// output still buffered, tells QMP clients why the VM ended and closes
    /// their connections, and marks the end of the lifetime.
    fn finish(
        &self,
        session: Session,
        vcpus: &Arc<[VcpuHandle]>,
        result: Result<StopReason, ControlError>,
    ) -> Result<RunOutcome, ControlError> {
        let stuck_vcpus = match crate::kvm::vcpu::stop_all(vcpus, ANSWER_DEADLINE) {
            Ok(()) => Vec::new(),
            Err(e) => {
                crate::cli::logger::stderr_line(format_args!("vmm: {e}; not waiting any longer"));
                e.indexes
            }
        };
        // The vCPUs have stopped (or were left behind): what is still
        // buffered goes out now, or is dropped and counted at the deadline.
        lock(&session.drain).flush_until(Instant::now() + FINAL_FLUSH);
        drop(session.raw);
        if let (Some(q), Ok(reason)) = (&session.qmp, &result) {
            // QMP's own `quit` and `system_reset` already announced it.
            if let Some(cause) = shutdown_cause(reason) {
                lock(q).event_sender().send(QmpEvent::Shutdown(cause));
            }
            lock(q).shutdown(std::time::Duration::from_millis(200));
        }
        let reason = result?;
        lock(&session.lifetime).mark_end(Instant::now(), &reason.describe());
        Ok(RunOutcome {
            reason,
            vcpu_stats: vcpus.iter().map(VcpuHandle::stats_arc).collect(),
            lifetime: session.lifetime,
            stuck_vcpus,
            console_bytes: self.devices.console_output.accepted(),
            console_bytes_dropped: self.devices.console_output.dropped(),
        })
    }

    /// The power-on image and each vCPU's power-on state, for resets.
    fn capture_power_on(&self) -> Result<(PowerOnImage, Vec<VcpuState>), MachineError> {
        let image = {
            let g = rcu::read_lock();
            PowerOnImage::capture(&self.vm, self.memory.read(&g).memory())
        }
        .map_err(MachineError::PowerOn)?;
        let msrs = self
            .vm
            .kvm()
            .get_msr_index_list()
            .map_err(MachineError::MsrList)?;
        let mut states = Vec::with_capacity(self.vcpu_fds.len());
        for (index, fd) in (0u32..).zip(&self.vcpu_fds) {
            states.push(
                VcpuState::capture(fd, msrs.as_slice())
                    .map_err(|source| MachineError::VcpuState { index, source })?,
            );
        }
        log::debug!(
            "power-on image: {} bytes of loaded RAM, {} MSRs per vCPU",
            image.loaded_bytes(),
            states.first().map_or(0, VcpuState::msr_count)
        );
        Ok((image, states))
    }

    /// Reboots the machine in place: every vCPU parked and put back in its
    /// power-on state, the interrupt controllers and PIT too, the devices
    /// reset (virtio-mem unplugs everything: its slots are retired and
    /// unmapped after a grace period; the requested size stays), guest RAM
    /// discarded and the loaded image written back. The vCPUs then run
    /// again, unless `keep_paused`. Control thread; on error the machine
    /// is in no state to run and the caller ends it.
    fn reboot(
        &self,
        vcpus: &[VcpuHandle],
        image: &PowerOnImage,
        keep_paused: bool,
        size_changed: &[SizeChanged],
    ) -> Result<(), String> {
        if let Some(msg) = self.fatal.first() {
            return Err(msg);
        }
        crate::kvm::vcpu::pause_all(vcpus, ANSWER_DEADLINE).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + ANSWER_DEADLINE;
        let started = Instant::now();
        for v in vcpus {
            v.reset(deadline)?;
        }
        // Each vCPU writes back the TSC it was captured with, one after
        // another. KVM treats TSC writes less than a second apart as one
        // synchronisation (`kvm_synchronize_tsc`); further apart, the
        // rebooted guest's CPUs would see different TSCs.
        let took = started.elapsed();
        if took >= std::time::Duration::from_secs(1) {
            log::warn!(
                "vCPU power-on states took {} ms to restore: their TSCs may differ",
                took.as_millis()
            );
        } else {
            log::info!(
                "vCPU power-on states restored in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
        }
        image
            .restore_interrupt_controllers(&self.vm)
            .map_err(|e| crate::error_chain(&e))?;
        self.devices.serial.reset();
        self.devices.ged.reset();
        for (h, changed) in self.hotplug.iter().zip(size_changed) {
            h.vmem
                .system_reset()
                .map_err(|e| format!("virtio-mem {}: {}", h.id, crate::error_chain(&e)))?;
            h.transport.system_reset();
            if let Some(size) = h.vmem.take_size_change() {
                changed(size);
            }
        }
        {
            let g = rcu::read_lock();
            image
                .restore_ram(self.memory.read(&g).memory())
                .map_err(|e| crate::error_chain(&e))?;
        }
        // Last: a request made by the old guest after the reset was asked
        // for is forgotten with it.
        self.devices.exit.rearm();
        if !keep_paused {
            vcpus.iter().for_each(VcpuHandle::resume);
        }
        Ok(())
    }

    /// Where fatal errors of vCPUs are collected.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn fatal_errors(&self) -> &Arc<FatalErrors> {
        &self.fatal
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The QMP `SHUTDOWN` cause of a reason to stop that QMP did not cause.
fn shutdown_cause(reason: &StopReason) -> Option<ShutdownCause> {
    match reason {
        StopReason::Guest(devices::ExitRequest::PowerOff) => Some(ShutdownCause::GuestShutdown),
        StopReason::Guest(devices::ExitRequest::Reset) => Some(ShutdownCause::GuestReset),
        StopReason::Signal(_) => Some(ShutdownCause::HostSignal),
        StopReason::Quit => Some(ShutdownCause::HostUi),
        StopReason::Fatal(_) | StopReason::Timeout => Some(ShutdownCause::HostError),
        StopReason::Qmp(_) => None,
    }
}

/// Replaces the panic hook with one that prints the message and location
/// without capturing a backtrace: capturing one reads files (the executable,
/// the working directory), which the seccomp filters forbid, so the default
/// hook with `RUST_BACKTRACE` set would turn a reportable panic into SIGSYS.
fn install_filtered_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            let location = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            crate::cli::logger::stderr_line(format_args!(
                "vmm: thread '{name}' panicked{location}: {payload}"
            ));
        }));
    });
}
