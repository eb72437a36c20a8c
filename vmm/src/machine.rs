//! The assembled VM: built from a [`VmConfig`], run until it ends, and
//! taken down in order.

use crate::config::VmConfig;
use crate::console::{ConsoleInput, RawTerminal};
use crate::control::{Console, ControlError, ControlLoop, Lifecycle, StopReason, StopSlot};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::guest_memory::{self, GuestMemoryError, MEMORY_MAP_LABEL, SharedMemory};
use crate::host::HostKind;
use crate::kernel_cmdline::appended_args;
use crate::kick::{self, KickError};
use crate::kvm::{self, KvmError};
use crate::signals::SignalFd;
use crate::vcpu::{FatalErrors, Marks, VcpuContext, VcpuError, VcpuHandle};
use crate::vm::{Vm, VmError};
use boot::BootInfo;
use rcu::RcuCell;
use std::sync::{Arc, Mutex};
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
    MemoryMap(#[source] boot::memory_map::MemoryMapError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    GuestMemory(#[from] GuestMemoryError),
    /// Devices could not be created.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
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
}

/// A VM ready to run.
pub struct Machine {
    config: VmConfig,
    host: HostKind,
    /// The VM (kept alive for the memory slots and vCPUs).
    pub vm: Arc<Vm>,
    /// The RCU-published guest memory map.
    pub memory: SharedMemory,
    /// Devices and buses.
    pub devices: DeviceManager,
    vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    vcpus: Vec<VcpuHandle>,
    fatal: Arc<FatalErrors>,
    marks: Arc<Marks>,
    boot: BootInfo,
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
    pub vcpu_stats: Vec<Arc<crate::vcpu::VcpuStats>>,
}

impl Machine {
    /// Creates the VM, its memory and devices, loads the kernel and sets up
    /// every vCPU. Nothing runs yet.
    pub fn build(config: VmConfig, start: Instant) -> Result<Self, MachineError> {
        rcu::set_wakeup_strategy(config.rcu_wakeup).map_err(MachineError::RcuStrategy)?;
        let host = HostKind::detect();
        if let Some(notice) = host.notice() {
            eprintln!("{notice}");
        }
        let kvm = kvm::open(config.cpus)?;
        let vm = Arc::new(Vm::new(kvm)?);
        let map = boot::MemoryMap::new(config.memory, config.hotplug_memory)
            .map_err(MachineError::MemoryMap)?;
        let (mem, _slots) = guest_memory::create_ram(&vm, &map.mmap_ranges())?;
        let devices = DeviceManager::new(&vm, Box::new(std::io::stdout()))?;

        let acpi = devices.acpi_config(config.cpus);
        let rsdp = boot::acpi::create_acpi_tables(&mem, &acpi).map_err(MachineError::Acpi)?;
        let appended = appended_args(&config.cmdline, host, config.hotplug_memory > 0);
        let cmdline = boot::cmdline::build_cmdline(&config.cmdline, &appended)?;
        let boot = boot::load_kernel(
            &mem,
            &boot::BootConfig {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                memory: &map,
                rsdp: Some(rsdp),
            },
        )?;

        let mut cpuid = boot::cpu::cpuid::supported_cpuid(vm.kvm()).map_err(MachineError::Cpuid)?;
        if host == HostKind::EmulationOnly {
            // Software-nested KVM (PVM) leaves an AP stuck in the PV
            // send-IPI hypercall; plain IPIs through the LAPIC work.
            boot::cpu::cpuid::clear_kvm_features(
                &mut cpuid,
                boot::cpu::cpuid::KVM_FEATURE_PV_SEND_IPI,
            );
        }
        let mut vcpu_fds = Vec::with_capacity(config.cpus as usize);
        for index in 0..config.cpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|source| MachineError::CreateVcpu { index, source })?;
            boot::configure_vcpu(
                &fd,
                &mem,
                &cpuid,
                index,
                config.cpus,
                (index == 0).then_some(&boot),
            )?;
            vcpu_fds.push(fd);
        }
        let cmdline_text = String::from_utf8_lossy(
            &boot::cmdline::cmdline_bytes(&cmdline)?
                .into_iter()
                .take_while(|b| *b != 0)
                .collect::<Vec<u8>>(),
        )
        .into_owned();

        Ok(Self {
            config,
            host,
            vm,
            memory: Arc::new(RcuCell::with_label(mem, MEMORY_MAP_LABEL)),
            devices,
            vcpu_fds,
            vcpus: Vec::new(),
            fatal: Arc::new(FatalErrors::new().map_err(MachineError::EventFd)?),
            marks: Arc::new(Marks::new(start)),
            boot,
            cmdline: cmdline_text,
        })
    }

    /// The host kind detected at build time.
    pub fn host(&self) -> HostKind {
        self.host
    }

    /// How the kernel was loaded.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// Time marks (start, first `KVM_RUN`).
    pub fn marks(&self) -> &Arc<Marks> {
        &self.marks
    }

    /// Starts the vCPUs and runs the control loop until the VM ends; stops
    /// every vCPU before returning.
    pub fn run(&mut self) -> Result<RunOutcome, MachineError> {
        let stop: StopSlot = Arc::new(Mutex::new(None));
        let signals = SignalFd::new().map_err(MachineError::Signals)?;
        let mut control = ControlLoop::new(Arc::clone(&stop))?;
        control.add(Arc::new(Mutex::new(Lifecycle::new(
            Arc::clone(&self.devices.exit),
            Arc::clone(&self.fatal),
            signals,
            Arc::clone(&stop),
        ))));
        let raw = RawTerminal::stdin();
        control.add(Arc::new(Mutex::new(Console::new(
            ConsoleInput::new(Arc::clone(&self.devices.serial), raw.is_some()),
            self.devices
                .serial_drained
                .try_clone()
                .map_err(MachineError::EventFd)?,
            Arc::clone(&stop),
        ))));

        kick::install_handler()?;
        let ctx = VcpuContext {
            pio: Arc::clone(&self.devices.pio),
            mmio: Arc::clone(&self.devices.mmio),
            memory: Arc::clone(&self.memory),
            exit: Arc::clone(&self.devices.exit),
            fatal: Arc::clone(&self.fatal),
            marks: Arc::clone(&self.marks),
        };
        for (index, fd) in (0u32..).zip(self.vcpu_fds.drain(..)) {
            self.vcpus.push(VcpuHandle::spawn(index, fd, ctx.clone())?);
        }
        let result = control.run();
        for v in &mut self.vcpus {
            v.stop();
        }
        drop(raw);
        let reason = result?;
        Ok(RunOutcome {
            reason,
            vcpu_stats: self.vcpus.iter().map(|v| v.stats_arc()).collect(),
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}
