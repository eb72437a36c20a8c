//! Guest memory: the RAM mapped at start, the RCU-published guest memory
//! map every reader of guest memory goes through, and memory hot-plug
//! (virtio-mem): the hot-plug region cut into slots that are mapped, given
//! to KVM and published only while they hold plugged memory, how that
//! memory is backed, and the device and control-thread worker that carry
//! the guest's plug and unplug requests to the slots.
//!
//! * [`guest_memory`]: guest RAM and the RCU-published map (`SharedGuestMap`,
//!   read inside read sections; retired maps dropped after a grace period).
//! * [`memory_manager`]: the hot-plug slots of one region; the map is
//!   swapped here (`MemoryManager::publish`), and retired slots unmapped
//!   after a grace period.
//! * [`memory_backing`]: how a hot-plug region's memory is backed
//!   (anonymous or memfd, hugetlb, prealloc, THP) and what plugging and
//!   unplugging blocks does to it.
//! * [`hotplug_device`]: one virtio-mem device wired to the VM (MMIO
//!   transport, irqfd, ioeventfd) and its control-thread worker that
//!   processes requests and reports resize outcomes.

pub(crate) mod guest_memory;
pub(crate) mod hotplug_device;
pub(crate) mod memory_backing;
pub(crate) mod memory_manager;
