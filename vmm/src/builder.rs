//! Building a VM from a [`VmConfig`]: memory, KVM VM, kernel and boot
//! structures, legacy devices, vCPUs. Each step is a function with a typed
//! error; nothing runs until [`crate::vmm::Vmm::run`].

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_devices::rotating_log::{RotatingLog, DEFAULT_LOG_CAP};
use vm_device::Bus;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::acpi::{create_acpi_tables, AcpiError};
use crate::arch::boot::{load_command_line, load_initramfs, load_kernel, write_boot_params, BootError};
use crate::arch::layout::*;
use crate::config::{SerialConfig, SerialSink, VmConfig};
use crate::device_manager::{DeviceError, PciDevices};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::boot_timer::BootTimer;
use crate::devices::cpu_hotplug::{cpu_hotplug_aml, CpuHotplug, CPU_HOTPLUG_SIZE};
use crate::devices::ged::{event, ged_aml, Ged, GED_SIZE};
use crate::devices::i8042::I8042;
use crate::devices::pci_hotplug::{PciHotplug, PCI_HOTPLUG_SIZE};
use crate::devices::serial::{SerialDevice, SerialOutput, SerialSnapshot};
use crate::devices::serial_socket::SerialSocket;
use crate::devices::vmgenid;
use crate::exit::ExitState;
use crate::memory::{create_guest_memory, GuestRam, MemoryError};
use crate::vmm::{Vmm, VmmParts};
use crate::vstate::vcpu::{ExitCounters, Vcpu, VcpuContext, VcpuError};
use crate::vstate::vm::{open_kvm, Vm, VmError};

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot create guest memory")]
    Memory(#[source] MemoryError),
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    #[error("cannot load the guest")]
    Boot(#[source] BootError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] AcpiError),
    #[error("cannot set the VM generation ID")]
    GenerationId(#[source] vmgenid::VmGenIdError),
    #[error("cannot set up a device")]
    Device(#[source] DeviceError),
    #[error("cannot set up vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("cannot open the serial output file {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the serial console socket")]
    SerialSocket(#[source] crate::devices::serial_socket::SerialSocketError),
    #[error("cannot restore the serial port")]
    Serial(#[source] crate::devices::serial::SerialError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot boot the firmware")]
    Firmware(#[source] crate::firmware::FirmwareError),
    #[error("cannot place device {name} on the bus")]
    Bus {
        name: &'static str,
        #[source]
        source: vm_device::BusError,
    },
}

fn serial_sink(cfg: &SerialSink) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match cfg {
        SerialSink::Stdout => Box::new(std::io::stdout()),
        SerialSink::Off => Box::new(std::io::sink()),
        // Rotated at 16 MiB: a guest printing without end cannot fill the disk.
        SerialSink::File(path) => Box::new(
            RotatingLog::open(path, DEFAULT_LOG_CAP)
                .map_err(|source| BuildError::SerialFile { path: path.display().to_string(), source })?,
        ),
    })
}

/// What every VM's devices hang off: the exit slot, the exit counters and
/// the port and MMIO buses.
#[derive(Clone)]
pub(crate) struct Buses {
    pub exit: Arc<ExitState>,
    pub counters: Arc<ExitCounters>,
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
}

impl Buses {
    pub(crate) fn new() -> Result<Self, BuildError> {
        Ok(Self {
            exit: Arc::new(ExitState::new().map_err(BuildError::EventFd)?),
            counters: Arc::new(ExitCounters::default()),
            io: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
        })
    }

    /// What each vCPU of the VM with `ram` is given.
    pub(crate) fn vcpu_context(&self, ram: &GuestRam) -> VcpuContext {
        VcpuContext {
            io_bus: self.io.clone(),
            mmio_bus: self.mmio.clone(),
            exit: self.exit.clone(),
            counters: self.counters.clone(),
            mem: ram.mem.clone(),
        }
    }
}

/// The platform devices every VM has besides PCI: the Generic Event
/// Device, the PCI and CPU hot-plug registers, COM1, i8042, the boot timer
/// and the ACPI power registers.
pub(crate) struct Platform {
    pub ged: Arc<Mutex<Ged>>,
    pub pci_hotplug: Arc<Mutex<PciHotplug>>,
    /// Present when vCPUs can be hot-plugged (`max_cpus` above `cpus`).
    pub cpu_hotplug: Option<Arc<Mutex<CpuHotplug>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
}

impl Platform {
    /// The AML of the GED, the VM generation ID and the CPU hot-plug
    /// controller, for the DSDT.
    pub(crate) fn aml(&self, max_cpus: u8) -> Vec<u8> {
        let mut aml = Vec::new();
        let mut ged_handlers = vec![(event::PCI, "\\_SB_.PCI0.PSCN"), (event::GENERATION_ID, vmgenid::NOTIFY_METHOD)];
        aml.extend(vmgenid::vmgenid_aml());
        if self.cpu_hotplug.is_some() {
            aml.extend(cpu_hotplug_aml(CPU_HOTPLUG_START, max_cpus));
            ged_handlers.push((event::CPU, "\\_SB_.CPUS.CSCN"));
        }
        aml.extend(ged_aml(GED_START, GED_IRQ, &ged_handlers));
        aml
    }
}

/// Creates the platform devices and places them on the buses. `cpus`
/// vCPUs are present of `max_cpus`; a restored UART starts from `serial_state`.
pub(crate) fn attach_platform(
    vm: &Vm,
    buses: &Buses,
    (cpus, max_cpus): (u8, u8),
    serial: &SerialConfig,
    serial_state: Option<&SerialSnapshot>,
    start: Instant,
) -> Result<Platform, BuildError> {
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&ged_irq, GED_IRQ).map_err(BuildError::Vm)?;
    let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
    let pci_hotplug = Arc::new(Mutex::new(PciHotplug::new().map_err(BuildError::EventFd)?));
    let place_mmio = |name, dev, base: u64, len| {
        buses.mmio.insert(dev, base, len).map_err(|source| BuildError::Bus { name, source })
    };
    place_mmio("GED", ged.clone(), GED_START, GED_SIZE)?;
    place_mmio("PCI hot-plug", pci_hotplug.clone(), PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE)?;
    // CPU hot-plug only when vCPUs can be added: its processor devices are
    // evaluated by the guest at boot.
    let cpu_hotplug = if max_cpus > cpus {
        let hp = Arc::new(Mutex::new(CpuHotplug::new(cpus, max_cpus).map_err(BuildError::EventFd)?));
        place_mmio("CPU hot-plug", hp.clone(), CPU_HOTPLUG_START, CPU_HOTPLUG_SIZE)?;
        Some(hp)
    } else {
        None
    };

    let serial_irq = EventFd::new(0).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(BuildError::Vm)?;
    let mut out = SerialOutput::new(serial_sink(&serial.output)?, buses.exit.clone());
    let socket = match &serial.socket {
        Some(path) => {
            let (socket, socket_out) = SerialSocket::bind(path).map_err(BuildError::SerialSocket)?;
            out = out.with_socket(socket_out);
            Some(socket)
        }
        None => None,
    };
    let uart = match serial_state {
        Some(s) => SerialDevice::from_state(s, serial_irq, out).map_err(BuildError::Serial)?,
        None => SerialDevice::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(uart));
    if let Some(socket) = socket {
        socket.spawn(serial.clone()).map_err(BuildError::SerialSocket)?;
    }
    let place = |name, dev, base: u16, len| {
        buses.io.insert(dev, u64::from(base), len).map_err(|source| BuildError::Bus { name, source })
    };
    let exit = &buses.exit;
    place("COM1", serial.clone(), COM1_PORT, 8)?;
    place("i8042", Arc::new(Mutex::new(I8042::new(exit.clone()))), I8042_PORT, 5)?;
    place("boot timer", Arc::new(Mutex::new(BootTimer::new(start, buses.counters.clone()))), BOOT_DEBUG_PORT, 1)?;
    place("ACPI PM", Arc::new(Mutex::new(AcpiPm::new(exit.clone()))), ACPI_PM_PORT, ACPI_PM_LEN)?;
    Ok(Platform { ged, pci_hotplug, cpu_hotplug, serial })
}

/// What `build_vm` and a restore hand to the running VMM.
pub(crate) struct Built {
    pub config: VmConfig,
    pub start: Instant,
    pub vm: Vm,
    pub ram: GuestRam,
    pub vcpus: Vec<Vcpu>,
    pub buses: Buses,
    pub pci: PciDevices,
    pub platform: Platform,
    pub vcpu_ctx: VcpuContext,
}

impl Built {
    pub(crate) fn into_vmm(self) -> Vmm {
        let Built { config, start, vm, ram, vcpus, buses, pci, platform, vcpu_ctx } = self;
        Vmm::new(VmmParts {
            config,
            start,
            vm,
            ram,
            vcpus,
            exit: buses.exit,
            serial: platform.serial,
            io_bus: buses.io,
            mmio_bus: buses.mmio,
            pci,
            ged: platform.ged,
            pci_hotplug: platform.pci_hotplug,
            cpu_hotplug: platform.cpu_hotplug,
            counters: buses.counters,
            vcpu_ctx,
        })
    }
}

/// Builds the VM described by `config`; `start` is when the VMM started.
pub fn build_vm(config: &VmConfig, start: Instant) -> Result<Vmm, BuildError> {
    if let Some(fw) = &config.firmware {
        return crate::firmware::build_firmware_vm(config, fw, start);
    }
    let step = |what: &str| log::debug!("{what}: {} µs after start", start.elapsed().as_micros());
    let kvm = open_kvm(config.cpus).map_err(BuildError::Vm)?;
    let ram = create_guest_memory(config.memory_mib << 20, config.hotplug_mib << 20).map_err(BuildError::Memory)?;
    step("guest memory");
    let vm = Vm::new(&kvm, &ram.mem).map_err(BuildError::Vm)?;
    step("KVM VM");

    let kernel = load_kernel(&ram.mem, &config.kernel).map_err(BuildError::Boot)?;
    step("kernel loaded");
    let initramfs = match &config.initramfs {
        Some(p) => Some(load_initramfs(&ram.mem, &kernel, p).map_err(BuildError::Boot)?),
        None => None,
    };
    let cmdline_size = load_command_line(&ram.mem, &config.cmdline).map_err(BuildError::Boot)?;

    let buses = Buses::new()?;
    let mut pci =
        PciDevices::new(vm.fd().clone(), buses.io.clone(), buses.mmio.clone(), &ram).map_err(BuildError::Device)?;
    for dev in config.devices.all() {
        pci.add(dev, false).map_err(BuildError::Device)?;
    }
    if let Some(backend) = ram.hotplug_backend().map_err(BuildError::Memory)? {
        pci.add_memory_device(&ram, backend).map_err(BuildError::Device)?;
    }
    step("PCI devices");

    let platform = attach_platform(&vm, &buses, (config.cpus, config.max_cpus), &config.serial, None, start)?;
    let mut acpi = pci.acpi(PCI_HOTPLUG_START);
    acpi.sb_aml.extend(platform.aml(config.max_cpus));
    let rsdp = create_acpi_tables(&ram.mem, config.cpus, config.max_cpus, &acpi).map_err(BuildError::Acpi)?;
    vmgenid::write_generation_id(&ram.mem).map_err(BuildError::GenerationId)?;
    write_boot_params(&ram.mem, ram.boot_size, &kernel, cmdline_size, initramfs, rsdp).map_err(BuildError::Boot)?;
    step("initramfs, command line, ACPI and boot parameters");

    let vcpu_ctx = buses.vcpu_context(&ram);
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let vcpu = Vcpu::new(&vm, id, vcpu_ctx.clone()).map_err(BuildError::Vcpu)?;
        let entry = (id == 0).then_some(kernel.entry);
        vcpu.configure(vm.supported_cpuid(), config.max_cpus, &ram.mem, entry).map_err(BuildError::Vcpu)?;
        vcpus.push(vcpu);
    }

    step("devices and vCPUs");
    Ok(Built { config: config.clone(), start, vm, ram, vcpus, buses, pci, platform, vcpu_ctx }.into_vmm())
}
