//! Booting through firmware (OVMF, as Debian's `ovmf` package installs
//! it) instead of loading a kernel.
//!
//! The firmware's code is mapped read-only at the top of 4 GiB (a KVM
//! memory slot: reads and fetches never exit; writes exit and are
//! ignored) and its variable store right below it as a CFI flash
//! ([`crate::devices::pflash`]) backed by the VM's own copy of the store,
//! which persists. The boot vCPU starts at the reset vector (KVM's reset
//! state: real mode, CS base 0xFFFF0000, IP 0xFFF0). The platform the
//! firmware looks for: the i440FX/PIIX chipset functions
//! ([`crate::devices::chipset`]) on the PCI bus with the reset control
//! register, a CMOS/RTC, the debug console (port 0x402, into the VMM log)
//! and fw_cfg ([`crate::devices::fw_cfg`]) carrying the memory map, the CPU
//! count, Skiff's own ACPI tables ([`fw_cfg_files`]) and SMBIOS tables
//! ([`smbios`]).

pub mod fw_cfg_files;
mod rom;
pub mod smbios;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::arch::layout::*;
use crate::builder::{attach_platform, BuildError, Built, Buses};
use crate::config::VmConfig;
use crate::device_manager::PciDevices;
use crate::devices::chipset::{ChipsetFunction, DebugCon, PiixPm, DEBUGCON_PORT, PIIX_SLOT, PM_FUNCTION};
use crate::devices::cmos::{Cmos, CMOS_PORT};
use crate::devices::fw_cfg::{FwCfg, FwCfgError, FW_CFG_PORT, FW_CFG_PORT_LEN};
use crate::devices::pflash::{FlashError, Pflash};
use crate::exit::ExitReason;
use crate::memory::create_guest_memory;
use crate::vmm::Vmm;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{open_kvm, Vm};

pub use rom::{FirmwareRom, FlashSlot};

/// Debian's OVMF build, used when `--firmware` names no file.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Most bytes of firmware (code and variable store) below 4 GiB.
pub const MAX_FIRMWARE_SIZE: u64 = 16 << 20;
/// Where KVM's TSS goes in firmware VMs (Intel): below the firmware, where
/// QEMU puts it; the direct-boot address lies inside the firmware.
pub const FIRMWARE_TSS_ADDRESS: usize = 0xfeff_d000;
/// KVM's identity-map page (Intel without unrestricted guest), right below
/// the TSS; the default lies inside the firmware too.
pub const FIRMWARE_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// Offset of a firmware volume header's signature, and the signature.
const FV_SIGNATURE_OFFSET: usize = 40;
const FV_SIGNATURE: &[u8; 4] = b"_FVH";
/// Firmware files are whole pages.
const PAGE: u64 = 4096;

/// The firmware of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareConfig {
    /// The code (OVMF_CODE*.fd), mapped read-only.
    pub code: PathBuf,
    /// The VM's variable store (a copy of OVMF_VARS*.fd), written through.
    pub vars: PathBuf,
    /// The VM's UUID (the SMBIOS system UUID).
    pub uuid: uuid::Uuid,
}

/// Why a firmware cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("cannot read the firmware {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a UEFI firmware volume: {why}")]
    NotFirmware { path: PathBuf, why: String },
    #[error("the firmware {path} is {size} bytes; it must be a non-zero multiple of 4096 bytes")]
    CodeSize { path: PathBuf, size: u64 },
    #[error(
        "the variable store {vars} ({vars_size} bytes) does not fit the firmware {code} ({code_size} bytes): \
         together they must make a power of two of at most 16 MiB (OVMF_CODE_4M.fd goes with OVMF_VARS_4M.fd)"
    )]
    Mismatch { code: PathBuf, code_size: u64, vars: PathBuf, vars_size: u64 },
    #[error("the variable store {path} does not exist and there is no template {template} to copy it from")]
    NoTemplate { path: PathBuf, template: PathBuf },
    #[error("cannot create the variable store {path} from {template}")]
    CopyVars {
        path: PathBuf,
        template: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad variable store")]
    Flash(#[source] FlashError),
    #[error("cannot map the firmware")]
    Map(#[source] std::io::Error),
    #[error("cannot register the firmware with KVM")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("cannot fill fw_cfg")]
    FwCfg(#[source] FwCfgError),
}

impl FirmwareError {
    /// Whether the error is about the given files (exit status 2) rather
    /// than the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            FirmwareError::Map(_)
                | FirmwareError::Kvm(_)
                | FirmwareError::FwCfg(_)
                | FirmwareError::Flash(FlashError::Map(_))
        )
    }
}

fn read_header(path: &Path) -> Result<(u64, Vec<u8>), FirmwareError> {
    use std::io::Read;
    let read = |source| FirmwareError::Read { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(read)?;
    let size = f.metadata().map_err(read)?.len();
    let mut head = vec![0u8; 64];
    let n = f.read(&mut head).map_err(read)?;
    head.truncate(n);
    Ok((size, head))
}

fn check_volume(path: &Path, head: &[u8]) -> Result<(), FirmwareError> {
    if head.get(FV_SIGNATURE_OFFSET..FV_SIGNATURE_OFFSET + 4) != Some(FV_SIGNATURE.as_slice()) {
        return Err(FirmwareError::NotFirmware {
            path: path.to_path_buf(),
            why: "no firmware volume header (_FVH) at its start".into(),
        });
    }
    Ok(())
}

/// The template a missing variable store is copied from: the firmware's
/// sibling with `VARS` for `CODE` in its name (OVMF_CODE_4M.fd →
/// OVMF_VARS_4M.fd).
pub fn vars_template(code: &Path) -> Option<PathBuf> {
    let name = code.file_name()?.to_str()?;
    name.contains("CODE").then(|| code.with_file_name(name.replacen("CODE", "VARS", 1)))
}

impl FirmwareConfig {
    /// Checks both files (and creates the variable store from its template
    /// when it does not exist yet); returns (code size, vars size).
    pub fn validate(&self) -> Result<(u64, u64), FirmwareError> {
        let (code_size, head) = read_header(&self.code)?;
        if code_size == 0 || code_size % PAGE != 0 || code_size > MAX_FIRMWARE_SIZE {
            return Err(FirmwareError::CodeSize { path: self.code.clone(), size: code_size });
        }
        check_volume(&self.code, &head)?;
        if !self.vars.exists() {
            self.create_vars()?;
        }
        let (vars_size, head) = read_header(&self.vars)?;
        check_volume(&self.vars, &head)?;
        let total = code_size.saturating_add(vars_size);
        if vars_size % PAGE != 0 || !total.is_power_of_two() || total > MAX_FIRMWARE_SIZE {
            return Err(FirmwareError::Mismatch {
                code: self.code.clone(),
                code_size,
                vars: self.vars.clone(),
                vars_size,
            });
        }
        Ok((code_size, vars_size))
    }

    /// Copies the template to a temporary name beside the store, then
    /// renames it: a failed copy leaves nothing behind.
    fn create_vars(&self) -> Result<(), FirmwareError> {
        let template = vars_template(&self.code).filter(|t| t.exists()).ok_or_else(|| FirmwareError::NoTemplate {
            path: self.vars.clone(),
            template: vars_template(&self.code).unwrap_or_else(|| PathBuf::from("OVMF_VARS*.fd")),
        })?;
        let tmp = self.vars.with_extension(format!("tmp{}", std::process::id()));
        let copy = std::fs::copy(&template, &tmp).and_then(|_| std::fs::rename(&tmp, &self.vars));
        copy.map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            FirmwareError::CopyVars { path: self.vars.clone(), template: template.clone(), source }
        })?;
        log::info!("variable store {} created from {}", self.vars.display(), template.display());
        Ok(())
    }
}

/// The OpenFirmware paths of the boot disks, in order, as QEMU writes them
/// into `bootorder` for virtio-blk on the root bus.
fn bootorder(pci: &PciDevices) -> Vec<String> {
    pci.infos()
        .iter()
        .filter(|d| d.kind == skiff_vmm_client::types::DeviceKind::Disk)
        .map(|d| format!("/pci@i0cf8/scsi@{:x}/disk@0,0", d.slot))
        .collect()
}

/// Builds a VM that boots `fw`; `config` gives everything else (its kernel
/// fields are not used).
pub fn build_firmware_vm(config: &VmConfig, fw: &FirmwareConfig, start: Instant) -> Result<Vmm, BuildError> {
    let bad = BuildError::Firmware;
    let step = |what: &str| log::debug!("{what}: {} µs after start", start.elapsed().as_micros());
    let (code_size, vars_size) = fw.validate().map_err(bad)?;
    let code_base = MMIO_HOLE_END - code_size;
    let vars_base = code_base - vars_size;
    let kvm = open_kvm(config.cpus).map_err(BuildError::Vm)?;
    let ram = create_guest_memory(config.memory_mib << 20, config.hotplug_mib << 20).map_err(BuildError::Memory)?;
    let vm = Vm::with_tss(&kvm, &ram.mem, FIRMWARE_TSS_ADDRESS).map_err(BuildError::Vm)?;
    vm.fd().set_identity_map_address(FIRMWARE_IDENTITY_MAP_ADDRESS).map_err(|e| bad(FirmwareError::Kvm(e)))?;
    let buses = Buses::new()?;
    let rom = FirmwareRom::load(&fw.code, code_base).map_err(bad)?;
    rom.register(vm.fd()).map_err(bad)?;
    let place_mmio = |name, dev, base: u64, len| {
        buses.mmio.insert(dev, base, len).map_err(|source| BuildError::Bus { name, source })
    };
    place_mmio("firmware code", Arc::new(Mutex::new(rom)), code_base, code_size)?;
    let mut flash = Pflash::open(&fw.vars).map_err(|e| bad(FirmwareError::Flash(e)))?;
    flash
        .set_romd(Box::new(FlashSlot { vm: vm.fd().clone(), base: vars_base }))
        .map_err(|e| bad(FirmwareError::Flash(e)))?;
    place_mmio("firmware variable store", Arc::new(Mutex::new(flash)), vars_base, vars_size)?;
    step("firmware mapped");

    let mut pci =
        PciDevices::new(vm.fd().clone(), buses.io.clone(), buses.mmio.clone(), &ram).map_err(BuildError::Device)?;
    let (mmio32, mmio64) = firmware_bar_windows(ram.boot_size, ram.hotplug.map_or(0, |h| h.size));
    pci.widen_bar_windows(mmio32, mmio64);
    chipset(&pci, &buses).map_err(BuildError::Device)?;
    for dev in config.devices.all() {
        pci.add(dev, false).map_err(BuildError::Device)?;
    }
    if let Some(backend) = ram.hotplug_backend().map_err(BuildError::Memory)? {
        pci.add_memory_device(&ram, backend).map_err(BuildError::Device)?;
    }
    let platform = attach_platform(&vm, &buses, (config.cpus, config.max_cpus), &config.serial, None, start)?;
    // No PS/2 controller for the firmware to wait on (serial is its console).
    let _ = buses.io.remove(u64::from(I8042_PORT));
    let i8042 = Arc::new(Mutex::new(crate::devices::i8042::I8042::absent(buses.exit.clone())));
    buses.io.insert(i8042, u64::from(I8042_PORT), 5).map_err(|source| BuildError::Bus { name: "i8042", source })?;
    let mut acpi = pci.acpi(PCI_HOTPLUG_START);
    acpi.sb_aml.extend(platform.aml(config.max_cpus));

    let mut fw_cfg = FwCfg::new(ram.mem.clone(), config.cpus, config.max_cpus, ram.boot_size);
    let hotplug_end = ram.hotplug.map(|h| h.addr + h.size);
    let cpus = (config.cpus, config.max_cpus);
    let smbios = smbios::SmbiosInfo {
        uuid: fw.uuid,
        cpus: config.cpus,
        max_cpus: config.max_cpus,
        ram: ram_ranges(ram.boot_size).into_iter().map(|(a, s)| (a.0, s)).collect(),
        hotplug: ram.hotplug.map_or(0, |h| h.size),
    };
    fw_cfg_files::add_files(&mut fw_cfg, ram.boot_size, hotplug_end, cpus, &acpi, &smbios, &bootorder(&pci))
        .map_err(|e| bad(FirmwareError::FwCfg(e)))?;
    let place_io = |name, dev, base: u16, len| {
        buses.io.insert(dev, u64::from(base), len).map_err(|source| BuildError::Bus { name, source })
    };
    place_io("fw_cfg", Arc::new(Mutex::new(fw_cfg)), FW_CFG_PORT, FW_CFG_PORT_LEN)?;
    let high = ram.boot_size.saturating_sub(MMIO_HOLE_START.min(ram.boot_size));
    let cmos = Cmos::new(ram.boot_size - high, high, config.cpus);
    place_io("CMOS", Arc::new(Mutex::new(cmos)), CMOS_PORT, 2)?;
    place_io("debug console", Arc::new(Mutex::new(DebugCon::new())), DEBUGCON_PORT, 1)?;
    step("firmware platform");

    let vcpu_ctx = buses.vcpu_context(&ram);
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let vcpu = Vcpu::new(&vm, id, vcpu_ctx.clone()).map_err(BuildError::Vcpu)?;
        // No boot entry: every vCPU keeps KVM's reset state; the first
        // runs the reset vector, the others wait for the firmware's SIPI.
        vcpu.configure(vm.supported_cpuid(), config.max_cpus, &ram.mem, None).map_err(BuildError::Vcpu)?;
        vcpus.push(vcpu);
    }
    log::info!(
        "booting firmware {} ({} KiB at {code_base:#x}, variable store {} at {vars_base:#x}), VM UUID {}",
        fw.code.display(),
        code_size >> 10,
        fw.vars.display(),
        fw.uuid
    );
    Ok(Built { config: config.clone(), start, vm, ram, vcpus, buses, pci, platform, vcpu_ctx }.into_vmm())
}

/// Where OVMF (on i440FX) puts BARs: the 32-bit window from its "UC32"
/// base (4 GiB minus the largest power of two that fits above low RAM) to
/// 0xFC000000, the 64-bit one anywhere above RAM and the hot-plug region
/// up to the CPU's physical address limit (OVMF sizes its window from the
/// address width: with 40 bits it took the top eighth, from 896 GiB).
pub fn firmware_bar_windows(mem_size: u64, hotplug_size: u64) -> ((u64, u64), (u64, u64)) {
    const MMIO32_END: u64 = 0xfc00_0000;
    let low_end = mem_size.min(MMIO_HOLE_START);
    let above = MMIO_HOLE_END - low_end;
    let uc32 = MMIO_HOLE_END - (1u64 << (63 - above.leading_zeros()));
    let start64 = pci_mmio64(mem_size, hotplug_size).0;
    // CPUID leaf 0x80000008 (address sizes) exists on every x86-64 CPU
    // KVM runs on; the guest's CPUID passes the host's width through.
    let bits = std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff;
    let end64 = 1u64 << bits.clamp(36, 52);
    ((uc32, MMIO32_END - uc32), (start64, end64.saturating_sub(start64)))
}

/// The i440FX host bridge, the PIIX3 ISA bridge, the PIIX4 PM function and
/// the reset control register.
fn chipset(pci: &PciDevices, buses: &Buses) -> Result<(), crate::device_manager::DeviceError> {
    use crate::device_manager::DeviceError;
    let bus = pci.pci_bus();
    let mut b = bus.lock().unwrap_or_else(|e| e.into_inner());
    let attach = |e| DeviceError::Attach { name: "chipset".into(), source: e };
    b.set_chipset_function(0, 0, Arc::new(Mutex::new(ChipsetFunction::i440fx_host_bridge()))).map_err(attach)?;
    b.set_chipset_function(PIIX_SLOT, 0, Arc::new(Mutex::new(ChipsetFunction::piix3_isa_bridge()))).map_err(attach)?;
    let pm = PiixPm::new(buses.io.clone(), buses.exit.clone());
    b.set_chipset_function(PIIX_SLOT, PM_FUNCTION, Arc::new(Mutex::new(pm))).map_err(attach)?;
    drop(b);
    let exit = buses.exit.clone();
    pci.set_reset_control(&buses.io, Box::new(move || exit.request(ExitReason::Reset))).map_err(DeviceError::Bus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_windows_follow_ovmf() {
        let ((s32, l32), (s64, l64)) = firmware_bar_windows(256 << 20, 0);
        assert_eq!((s32, s32 + l32), (0x8000_0000, 0xfc00_0000));
        assert!(s64 >= 1 << 32 && l64 > 0);
        // 3 GiB of RAM: low RAM ends at the hole, the window starts there.
        let ((s32, _), (s64, _)) = firmware_bar_windows(4 << 30, 1 << 30);
        assert_eq!(s32, MMIO_HOLE_START);
        assert!(s64 >= (6u64 << 30));
    }

    #[test]
    fn vars_template_is_the_code_files_sibling() {
        assert_eq!(
            vars_template(Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd")),
            Some(PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"))
        );
        assert_eq!(vars_template(Path::new("/srv/fw.fd")), None);
    }
}
