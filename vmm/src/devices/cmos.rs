//! The PC's CMOS: an MC146818 real-time clock and its battery-backed RAM
//! on ports 0x70 (index; bit 7 masks NMIs) and 0x71 (data).
//!
//! The clock reads the host's UTC time plus an offset the guest sets by
//! writing the time registers (with register B's SET bit, as firmware
//! does). It never reports an update in progress; register D says the RAM
//! and time are valid. Memory sizes sit where SeaBIOS and OVMF look for
//! them when fw_cfg does not tell: 0x34/0x35 (RAM from 16 MiB to 4 GiB, in
//! 64 KiB units), 0x5b-0x5d (RAM above 4 GiB, in 64 KiB units), 0x5f (CPUs
//! minus one).

use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::BusDevice;

/// The index port.
pub const CMOS_PORT: u16 = 0x70;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VALID: u8 = 0x80;

/// The CMOS: 128 bytes of RAM, the selected index and the clock offset.
pub struct Cmos {
    ram: [u8; 128],
    index: usize,
    /// Guest time minus host time, in seconds.
    offset: i64,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0xf)
}

fn host_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Cmos {
    /// A CMOS for `low_ram` bytes below 4 GiB, `high_ram` above, `cpus`.
    pub fn new(low_ram: u64, high_ram: u64, cpus: u8) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26;
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VALID;
        let above_16m = (low_ram.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        // 0x30/0x31: RAM from 1 MiB to 64 MiB in KiB, as SeaBIOS reads it.
        let above_1m = (low_ram.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        ram[0x30..0x32].copy_from_slice(&above_1m.to_le_bytes());
        ram[0x17..0x19].copy_from_slice(&above_1m.to_le_bytes());
        let high = (high_ram >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        ram[0x5f] = cpus.saturating_sub(1);
        Self { ram, index: 0, offset: 0 }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    /// The guest's current time, seconds since the epoch.
    fn now(&self) -> i64 {
        host_now().saturating_add(self.offset)
    }

    /// Writes the time fields of `t` into the RAM image.
    fn latch_time(&mut self, t: i64) {
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (h, min, s) = ((secs / 3600) as u8, ((secs / 60) % 60) as u8, (secs % 60) as u8);
        let hour = if self.ram[REG_B] & B_24H != 0 {
            self.encode(h)
        } else {
            // 12-hour mode: 12, 1..11, with bit 7 for PM.
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        };
        self.ram[SECONDS] = self.encode(s);
        self.ram[MINUTES] = self.encode(min);
        self.ram[HOURS] = hour;
        self.ram[WEEKDAY] = self.encode(((days + 4).rem_euclid(7) + 1) as u8);
        self.ram[DAY] = self.encode(d as u8);
        self.ram[MONTH] = self.encode(m as u8);
        self.ram[YEAR] = self.encode(y.rem_euclid(100) as u8);
        self.ram[CENTURY] = self.encode((y.div_euclid(100)).clamp(0, 99) as u8);
    }

    /// The time the guest wrote into the RAM image (after SET cleared).
    fn written_time(&self) -> Option<i64> {
        let f = |i| i64::from(self.decode(self.ram[i]));
        let raw_hour = self.ram[HOURS];
        let hour = if self.ram[REG_B] & B_24H != 0 {
            f(HOURS)
        } else {
            let h = i64::from(self.decode(raw_hour & 0x7f)) % 12;
            h + if raw_hour & 0x80 != 0 { 12 } else { 0 }
        };
        let (year, month, day) = (f(CENTURY) * 100 + f(YEAR), f(MONTH), f(DAY));
        let (min, sec) = (f(MINUTES), f(SECONDS));
        let valid = (1..=12).contains(&month) && (1..=31).contains(&day) && hour < 24 && min < 60 && sec < 60;
        valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
    }

    fn read_reg(&mut self, index: usize) -> u8 {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY if self.ram[REG_B] & B_SET == 0 => {
                self.latch_time(self.now());
                self.ram[index]
            }
            REG_A => self.ram[REG_A] & 0x7f, // never updating
            REG_C => std::mem::take(&mut self.ram[REG_C]),
            REG_D => D_VALID,
            _ => self.ram[index],
        }
    }

    fn write_reg(&mut self, index: usize, value: u8) {
        match index {
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                if !was_set && value & B_SET != 0 {
                    // Entering SET: the guest edits a frozen copy of the time.
                    self.latch_time(self.now());
                }
                // Format bits change how the frozen fields read: re-latch
                // in the new format unless the guest is editing them.
                self.ram[REG_B] = value;
                if was_set && value & B_SET == 0 {
                    if let Some(t) = self.written_time() {
                        self.offset = t - host_now();
                    } else {
                        log::warn!("cmos: the guest set an invalid time; the clock keeps its time");
                    }
                }
            }
            REG_C | REG_D => {}
            _ => self.ram[index] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index as u8,
            1 => self.read_reg(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = usize::from(value & 0x7f),
            1 => self.write_reg(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(0x70, 0, &[index | 0x80]);
        let mut b = [0];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    fn write(c: &mut Cmos, index: u8, value: u8) {
        c.write(0x70, 0, &[index]);
        c.write(0x70, 1, &[value]);
    }

    #[test]
    fn dates_round_trip() {
        for days in [-1, 0, 59, 365, 11_016, 19_723, 20_000, 47_482] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn memory_sizes_and_valid_bit() {
        let mut c = Cmos::new(256 << 20, 1 << 30, 2);
        let v = u16::from_le_bytes([read(&mut c, 0x34), read(&mut c, 0x35)]);
        assert_eq!(u64::from(v) << 16, (256 << 20) - (16 << 20));
        assert_eq!(read(&mut c, 0x5c), 0x40); // 1 GiB = 0x4000 * 64 KiB
        assert_eq!(read(&mut c, 0x5f), 1);
        assert_eq!(read(&mut c, 0x0d), 0x80);
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0);
    }

    #[test]
    fn the_guest_sets_the_time_in_bcd_and_binary() {
        let mut c = Cmos::new(64 << 20, 0, 1);
        write(&mut c, 0x0b, B_24H | B_SET);
        for (i, v) in [(0x32, 0x20), (0x09, 0x24), (0x08, 0x02), (0x07, 0x29), (0x04, 0x23), (0x02, 0x59), (0x00, 0x30)]
        {
            write(&mut c, i, v);
        }
        write(&mut c, 0x0b, B_24H);
        assert_eq!(read(&mut c, 0x09), 0x24);
        assert_eq!(read(&mut c, 0x08), 0x02);
        assert_eq!(read(&mut c, 0x32), 0x20);
        write(&mut c, 0x0b, B_24H | B_BINARY);
        assert_eq!(read(&mut c, 0x09), 24);
        // Garbage in the time registers keeps the clock as it was.
        write(&mut c, 0x0b, B_24H | B_BINARY | B_SET);
        write(&mut c, 0x08, 0xff);
        write(&mut c, 0x0b, B_24H | B_BINARY);
        assert_eq!(read(&mut c, 0x09), 24);
        // Odd accesses never panic.
        c.write(0x70, 5, &[1]);
        c.write(0x70, 1, &[]);
        let mut b = [0u8; 2];
        c.read(0x70, 3, &mut b);
    }
}
