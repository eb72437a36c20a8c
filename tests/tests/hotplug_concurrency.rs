//! Memory hot-plug under running vCPUs, with tiny guests.
//!
//! Both vCPUs run a loop in CPL3 (native speed even where KVM emulates
//! kernel code) that writes and checks a counter in base RAM and in a
//! hot-plug slot that stays plugged, and touches a slot that the test keeps
//! plugging and unplugging (in a block that is unplugged with the slot's
//! last ones). Every 256 rounds each vCPU asks a "DMA" test
//! device to read those addresses through the VMM's published memory map,
//! on its own vCPU thread inside an RCU read section, as device emulation
//! does. Meanwhile the test thread plugs and unplugs slots thousands of
//! times: new KVM memory slots, new maps published, old maps and slot
//! mappings freed through call_rcu. Checked: no guest-visible corruption,
//! no map freed under a reader, mappings back to the start afterwards, and,
//! as a soak, RSS, mappings and open file descriptors flat over the cycles.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use devices::virtio::MemoryBackend;
use devices::{BusDevice, BusRange, ExitRequest};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tests::bare_vm::{BareVm, TEST_MMIO};
use tests::guest_code;
use tests::proc_maps::{address_range, overlaps};
use vm_memory::{Bytes, GuestAddress};
use vmm::test_utils::SharedGuestMap;
use vmm::test_utils::StopReason;
use vmm::test_utils::{MAX_RETIRED_SLOTS, SLOT_SIZE};

const HOTPLUG_BASE: u64 = 1 << 32;
const DMA: u64 = TEST_MMIO + 0x1000;

guest_code! {
    /// CPL0: drop to CPL3 (user stack in r13), then the loop. Registers:
    /// rdi = base RAM word, rsi = stable hot-plug word, rbp = cycling
    /// hot-plug word, rbx = DMA device, r12 = round counter.
    fn hotplug_loop(hotplug_loop_start, hotplug_loop_end) in user mode {
        "2:",
        "inc r12",
        "mov qword ptr [rdi], r12",
        "mov qword ptr [rsi], r12",
        "mov rax, qword ptr [rdi]",
        "cmp rax, r12",
        "jne 4f",
        "mov rax, qword ptr [rsi]",
        "cmp rax, r12",
        "jne 4f",
        "mov qword ptr [rbp], r12",
        "mov rax, qword ptr [rbp]",
        "mov qword ptr [rdi + 8], r12",
        "test r12, 0xff",
        "jnz 2b",
        "mov qword ptr [rbx + 8], r12",
        "mov qword ptr [rbx], rsi",
        "mov qword ptr [rbx], rdi",
        "mov qword ptr [rbx + 16], rbp",
        "jmp 2b",
        "4:",
        "mov qword ptr [rbx + 24], r12",
        "jmp 4b",
    }
}

/// Reads guest memory through the published map when the guest asks, on
/// the vCPU thread, and checks the map is alive while it holds it.
struct DmaChecker {
    memory: SharedGuestMap,
    expected: [AtomicU64; 2],
    reads: AtomicU64,
    mismatches: AtomicU64,
    violations: AtomicU64,
    unplugged_reads: AtomicU64,
    guest_errors: AtomicU64,
}

impl BusDevice for DmaChecker {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let value = u64::from_le_bytes(v);
        let _ = base;
        match offset {
            8 => self.expected[0].store(value, Ordering::Relaxed),
            0 | 16 => {
                let g = rcu::read_lock();
                let map = self.memory.read(&g);
                let mut word = [0u8; 8];
                let ok = map.read_slice(&mut word, GuestAddress(value)).is_ok();
                // Hold the map a little, as a slow device would.
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
                if map.freed_under_reader() {
                    self.violations.fetch_add(1, Ordering::Relaxed);
                }
                drop(g);
                self.reads.fetch_add(1, Ordering::Relaxed);
                if offset == 0 {
                    // Stable addresses: the word the guest just wrote. The
                    // two vCPUs share this device, so accept either's
                    // latest expectation only when it matches the word
                    // itself (the guest checked it before asking).
                    if !ok {
                        self.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                } else if !ok {
                    self.unplugged_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
            24 => {
                self.guest_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// RSS (KiB), mappings at least one hot-plug slot in size, and open file
/// descriptors of this process. (Mappings are counted by size because the
/// kernel may merge a slot's anonymous mapping with a neighbouring one, which
/// changes the total number of mappings but not this count: only the one
/// slot that stays plugged is that large.)
fn footprint() -> (u64, usize, usize) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            let (a, b) = address_range(l);
            b - a >= SLOT_SIZE
        })
        .count();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    (rss, maps, fds)
}

/// Lines of `/proc/self/maps` overlapping `[start, start + len)`.
fn mappings_overlapping(start: u64, len: u64) -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| overlaps(l, start, len))
        .map(str::to_string)
        .collect()
}

#[test]
fn thousands_of_map_swaps_under_running_vcpus() {
    let cycles: u64 = std::env::var("HOTPLUG_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let mut vm = BareVm::with_hotplug(2, 64 << 20, 4 * SLOT_SIZE, hotplug_loop(), 0);
    let hp = Arc::clone(vm.machine.hotplug.first().expect("hot-plug device"));
    // This thread is the control thread (it runs the VM below).
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);

    // Slot 0 stays plugged for the whole test; slots 1..3 cycle.
    hp.manager.plug(HOTPLUG_BASE, SLOT_SIZE).unwrap();
    let dma = Arc::new(DmaChecker {
        memory: Arc::clone(&vm.machine.memory),
        expected: [AtomicU64::new(0), AtomicU64::new(0)],
        reads: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        unplugged_reads: AtomicU64::new(0),
        guest_errors: AtomicU64::new(0),
    });
    vm.machine
        .devices
        .add_mmio(BusRange::new(DMA, 4096).unwrap(), dma.clone())
        .unwrap();
    for cpu in 0..2u64 {
        vm.start_vcpu(cpu as usize, 0, 0x7_0000 - cpu * 0x1000, true, |r| {
            r.rdi = 0x20_0000 + cpu * 0x1_0000;
            r.rsi = HOTPLUG_BASE + cpu * 0x1000;
            // In a block that stays plugged while the slot's first block is
            // unplugged on its own: a write to an unplugged block of a mapped
            // slot stops the VM (read-only; see hostile_guest), while a write
            // to a slot that is not mapped at all goes nowhere (no memslot).
            r.rbp = HOTPLUG_BASE + SLOT_SIZE + (4 << 20) + cpu * 0x1000;
            r.rbx = DMA;
            r.r13 = 0x6_0000 - cpu * 0x1000;
            r.r12 = 0;
        });
    }
    vm.map_high(HOTPLUG_BASE, 1 << 30);

    let exit = Arc::clone(&vm.machine.devices.exit);
    let hp2 = Arc::clone(&hp);
    let dma2 = Arc::clone(&dma);
    let memory = Arc::clone(&vm.machine.memory);
    rcu::drain_call_rcu();
    let before = rcu::stats();
    let driver = std::thread::spawn(move || {
        // This thread plays the control thread: it reads the map in fenced
        // mode, as the VMM's control thread does.
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        // Wait until both vCPUs run their loops.
        let end = Instant::now() + Duration::from_secs(120);
        while dma2.reads.load(Ordering::Relaxed) < 8 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        let start = Instant::now();
        let mut hosts = std::collections::BTreeSet::new();
        let mut samples = Vec::new();
        let mut busy = 0u64;
        for i in 0..cycles {
            if i == 100 || i == cycles / 2 {
                // Let the previous cycle's unmapping (a call_rcu callback)
                // happen first.
                rcu::drain_call_rcu();
                samples.push((i, footprint()));
            }
            let slot = 1 + (i % 3);
            let gpa = HOTPLUG_BASE + slot * SLOT_SIZE;
            // Too many retired slots waiting for a grace period: the guest
            // would be answered BUSY and retry; so does this thread.
            while let Err(e) = hp2.manager.plug(gpa, SLOT_SIZE) {
                let backlog = std::error::Error::source(&e)
                    .is_some_and(|s| s.to_string().contains("wait to be unmapped"));
                assert!(backlog, "{e:?}");
                busy += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            for (g, host, len) in hp2.manager.mapped_host_ranges() {
                if g == gpa {
                    hosts.insert((host, len));
                }
            }
            // Partly unplug first (MADV_DONTNEED path), then the rest.
            hp2.manager.unplug(gpa, 2 << 20).unwrap();
            hp2.manager
                .unplug(gpa + (2 << 20), SLOT_SIZE - (2 << 20))
                .unwrap();
        }
        let took = start.elapsed();
        rcu::drain_call_rcu();
        samples.push((cycles, footprint()));
        exit.request(ExitRequest::PowerOff);
        let g = rcu::read_lock();
        let generation = memory.read(&g).generation();
        drop(g);
        (took, generation, hosts, samples, busy)
    });
    let reason = vm.run(Duration::from_secs(600));
    let (took, generation, hosts, samples, busy) = driver.join().unwrap();
    assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
    rcu::drain_call_rcu();
    let after = rcu::stats();

    // What the guest did: its round counters are in RAM.
    let g = rcu::read_lock();
    let map = vm.machine.memory.read(&g);
    let rounds: Vec<u64> = (0..2u64)
        .map(|cpu| {
            map.read_obj::<u64>(GuestAddress(0x20_0008 + cpu * 0x1_0000))
                .unwrap()
        })
        .collect();
    drop(g);
    let st = hp.manager.stats();
    println!(
        "hot-plug concurrency: {cycles} plug/unplug cycles in {:.2} s ({:.0} us per cycle); \
         maps published {}; slots mapped {} unmapped {}; MADV_DONTNEED {} MiB; \
         guest rounds {:?}; DMA reads {} (of unplugged memory {}); \
         RCU violations {}; corruption {}; guest-detected errors {}; \
         call_rcu {} callbacks {} grace periods {} force_rcu {} membarriers {}",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / cycles as f64,
        generation,
        st.slots_mapped.load(Ordering::Relaxed),
        st.slots_unmapped.load(Ordering::Relaxed),
        st.madvised_bytes.load(Ordering::Relaxed) >> 20,
        rounds,
        dma.reads.load(Ordering::Relaxed),
        dma.unplugged_reads.load(Ordering::Relaxed),
        dma.violations.load(Ordering::Relaxed),
        dma.mismatches.load(Ordering::Relaxed),
        dma.guest_errors.load(Ordering::Relaxed),
        after.call_rcu - before.call_rcu,
        after.callbacks_run - before.callbacks_run,
        after.grace_periods - before.grace_periods,
        after.force_rcu - before.force_rcu,
        after.membarriers - before.membarriers,
    );
    println!(
        "plugs refused while {MAX_RETIRED_SLOTS} retired slots waited for a grace period: {busy}"
    );
    println!("soak footprint (after cycle: RSS KiB, slot-sized mappings, fds): {samples:?}");
    // Flat: same mappings and descriptors between cycles; RSS within 4 MiB
    // (a leaked slot would be 128 MiB of mapping, a leaked block 2 MiB).
    let (_, (rss0, maps0, fds0)) = samples[0];
    for &(i, (rss, maps, fds)) in &samples[1..] {
        assert_eq!(maps, maps0, "mappings grew by cycle {i}: {samples:?}");
        assert_eq!(fds, fds0, "descriptors grew by cycle {i}: {samples:?}");
        assert!(rss <= rss0 + 4096, "RSS grew by cycle {i}: {samples:?}");
    }
    assert_eq!(after.callbacks_run, after.call_rcu, "callbacks left behind");
    assert_eq!(
        dma.violations.load(Ordering::Relaxed),
        0,
        "a map was freed under a reader"
    );
    assert_eq!(
        dma.mismatches.load(Ordering::Relaxed),
        0,
        "stable memory unreadable"
    );
    assert_eq!(
        dma.guest_errors.load(Ordering::Relaxed),
        0,
        "the guest saw corrupted memory"
    );
    assert!(
        rounds.iter().all(|r| *r > 256),
        "vCPUs did not run: {rounds:?}"
    );
    assert!(generation > 2 * cycles, "maps published: {generation}");
    assert_eq!(
        st.slots_unmapped.load(Ordering::Relaxed),
        cycles,
        "every cycled slot unmapped"
    );
    assert_eq!(
        hp.manager.mapped_slots(),
        1,
        "only the stable slot stays mapped"
    );
    let stable = hp.manager.mapped_host_ranges();
    assert_eq!(stable.len(), 1);
    for (host, len) in hosts {
        if host == stable[0].1 {
            continue;
        }
        let left = mappings_overlapping(host, len);
        assert!(
            left.is_empty(),
            "unplugged slot still mapped at {host:#x}: {left:?}"
        );
    }
    assert_eq!(
        after.membarriers, before.membarriers,
        "a grace period interrupted the vCPUs"
    );
}
