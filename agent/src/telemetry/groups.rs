//! Which processes form each VM in the probes' `TRACKED` table: the slot-or-overflow
//! encoding the kernel side reads, kept in step with each VM's membership once a second, and
//! each group's cumulative counters turned into growth. Behind [`TrackedTable`], so the
//! bookkeeping is tested against an in-memory table.

use super::probes::ProbeUsage;
use prescient_probes_common::{tracked, GroupCounters};
use std::collections::HashMap;

/// The kernel's table of tracked processes as the agent edits it: a trait so that [`Groups`]'
/// bookkeeping is tested without a kernel.
pub trait TrackedTable {
    /// The entry in `slot` (0 when the slot is free or unreadable).
    fn entry(&self, slot: u32) -> u64;
    fn set_entry(&mut self, slot: u32, entry: u64);
    /// Every tracked process whose slot another holds, with its group.
    fn overflow(&self) -> Vec<(u32, u32)>;
    fn set_overflow(&mut self, tgid: u32, group: u32);
    fn remove_overflow(&mut self, tgid: u32);
}

/// Makes `tgid` count in `group`: in its slot when that is free (or already its own), else in
/// the overflow hash with the slot marked.
fn track(table: &mut impl TrackedTable, tgid: u32, group: u32) {
    let slot = tracked::slot(tgid);
    let old = table.entry(slot);
    let held_by = tracked::tgid(old);
    // An exiting process's entry is kept only for its last sockets' closes.
    if held_by == tgid || held_by == 0 || old & tracked::EXITING_BIT != 0 {
        let entry = (old & tracked::OVERFLOW_BIT) | tracked::entry(tgid, group);
        if old != entry {
            table.set_entry(slot, entry);
        }
        if old & tracked::OVERFLOW_BIT != 0 {
            // It may have overflowed before its slot came free: one place only.
            table.remove_overflow(tgid);
        }
    } else {
        table.set_overflow(tgid, group);
        if old & tracked::OVERFLOW_BIT == 0 {
            table.set_entry(slot, old | tracked::OVERFLOW_BIT);
        }
    }
}

/// Stops counting `tgid` (wherever it is), and clears its slot's overflow mark when no other
/// overflowed process maps to that slot.
fn untrack(table: &mut impl TrackedTable, tgid: u32) {
    let slot = tracked::slot(tgid);
    let old = table.entry(slot);
    if tracked::tgid(old) == tgid {
        table.set_entry(slot, old & tracked::OVERFLOW_BIT);
        return;
    }
    if old & tracked::OVERFLOW_BIT == 0 {
        return;
    }
    table.remove_overflow(tgid);
    let left = table.overflow();
    if !left.iter().any(|&(t, _)| tracked::slot(t) == slot) {
        table.set_entry(slot, old & !tracked::OVERFLOW_BIT);
    }
}

/// Which group index each VM has, which processes the agent has put in the kernel's table,
/// and each group's counters as last read, to turn cumulative counters into growth.
pub struct Groups {
    capacity: u32,
    index: HashMap<String, u32>,
    /// The next index to try: indices are handed out round-robin, so a VM's index (whose
    /// forked processes may still be counting in it for a moment) is reused as late as
    /// possible.
    next: u32,
    /// Processes the agent tracked.
    members: std::collections::HashSet<u32>,
    /// Each group's counters at the last read (or when it was handed out).
    last: HashMap<u32, GroupCounters>,
}

impl Groups {
    pub fn new(capacity: u32) -> Groups {
        Groups {
            capacity: capacity.min(tracked::MAX_GROUPS),
            index: HashMap::new(),
            next: 0,
            members: Default::default(),
            last: HashMap::new(),
        }
    }

    /// VM `name`'s group index, handed out at its first use (None when every index is taken).
    fn index_of(
        &mut self,
        name: &str,
        read: &impl Fn(u32) -> Option<GroupCounters>,
    ) -> Option<u32> {
        if let Some(&i) = self.index.get(name) {
            return Some(i);
        }
        let in_use: std::collections::HashSet<u32> = self.index.values().copied().collect();
        let i = (0..self.capacity)
            .map(|k| (self.next + k) % self.capacity)
            .find(|i| !in_use.contains(i))?;
        self.next = (i + 1) % self.capacity;
        self.index.insert(name.to_string(), i);
        // Whatever the index counted for an earlier VM is not this one's.
        self.last.insert(i, read(i).unwrap_or(GroupCounters::ZERO));
        Some(i)
    }

    /// The VM whose group index is `group`.
    /// The group index a VM has, if it has one.
    pub(super) fn index(&self, vm: &str) -> Option<u32> {
        self.index.get(vm).copied()
    }

    pub(super) fn name_of(&self, group: u32) -> Option<&str> {
        self.index
            .iter()
            .find(|(_, &g)| g == group)
            .map(|(name, _)| name.as_str())
    }

    /// Tracks `tgid` in VM `name` now.
    pub fn join(
        &mut self,
        table: &mut impl TrackedTable,
        name: &str,
        tgid: u32,
        read: impl Fn(u32) -> Option<GroupCounters>,
    ) {
        if tgid == 0 {
            return;
        }
        if let Some(group) = self.index_of(name, &read) {
            track(table, tgid, group);
            self.members.insert(tgid);
        }
    }

    /// Brings the kernel's table in step with `vms` (each VM's name and processes now), and
    /// returns each VM's growth since the previous call. Every member's entry is checked, not
    /// only new ones: an entry lost to a racing writer, or cleared when a process's leader
    /// exited before its other threads, is put back within a second. Processes that left
    /// every VM are untracked; what they counted while in a VM stays in its group. VMs that
    /// are gone give back their index.
    pub fn update(
        &mut self,
        table: &mut impl TrackedTable,
        vms: &[(String, Vec<u32>)],
        read: impl Fn(u32) -> Option<GroupCounters>,
    ) -> Vec<(String, ProbeUsage)> {
        // Gone VMs give back their index first, so new ones can have it.
        self.index
            .retain(|name, _| vms.iter().any(|(n, _)| n == name));
        let live: std::collections::HashSet<u32> = self.index.values().copied().collect();
        self.last.retain(|g, _| live.contains(g));
        let mut now_members = std::collections::HashSet::new();
        for (name, procs) in vms {
            let Some(group) = self.index_of(name, &read) else {
                continue;
            };
            for &tgid in procs.iter().filter(|&&t| t != 0) {
                track(table, tgid, group);
                now_members.insert(tgid);
            }
        }
        for tgid in self.members.drain() {
            if !now_members.contains(&tgid) {
                untrack(table, tgid);
            }
        }
        self.members = now_members;
        let mut out = Vec::with_capacity(vms.len());
        for (name, _) in vms {
            let mut usage = ProbeUsage::default();
            if let Some(&group) = self.index.get(name) {
                if let Some(now) = read(group) {
                    let before = self.last.insert(group, now).unwrap_or(GroupCounters::ZERO);
                    usage.add_growth(&now, &before);
                }
            }
            out.push((name.clone(), usage));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's table in memory, and the kernel's side of it: which group a process's
    /// switch would charge (what the probes' `group_of` computes).
    #[derive(Default)]
    struct MemTable {
        slots: HashMap<u32, u64>,
        overflow: HashMap<u32, u32>,
    }

    impl TrackedTable for MemTable {
        fn entry(&self, slot: u32) -> u64 {
            self.slots.get(&slot).copied().unwrap_or(0)
        }
        fn set_entry(&mut self, slot: u32, entry: u64) {
            self.slots.insert(slot, entry);
        }
        fn overflow(&self) -> Vec<(u32, u32)> {
            self.overflow.iter().map(|(&t, &g)| (t, g)).collect()
        }
        fn set_overflow(&mut self, tgid: u32, group: u32) {
            self.overflow.insert(tgid, group);
        }
        fn remove_overflow(&mut self, tgid: u32) {
            self.overflow.remove(&tgid);
        }
    }

    impl MemTable {
        fn group_of(&self, tgid: u32) -> Option<u32> {
            let e = self.entry(tracked::slot(tgid));
            if tracked::tgid(e) == tgid {
                return (e & tracked::EXITING_BIT == 0).then_some(tracked::group(e));
            }
            if e & tracked::OVERFLOW_BIT == 0 {
                return None;
            }
            self.overflow.get(&tgid).copied()
        }
    }

    fn counters(cpu_ns: u64, waits: u64, bucket: usize) -> GroupCounters {
        let mut c = GroupCounters::ZERO;
        c.cpu_ns = cpu_ns;
        c.runq_wait_ns = waits * 1000;
        c.runq_hist[bucket] = waits;
        c
    }

    #[test]
    fn colliding_processes_overflow_and_come_back() {
        let mut t = MemTable::default();
        let (a, b, c) = (1000, 1000 + tracked::SLOTS, 1000 + 2 * tracked::SLOTS);
        track(&mut t, a, 1);
        track(&mut t, b, 2);
        track(&mut t, c, 3);
        assert_eq!(
            (t.group_of(a), t.group_of(b), t.group_of(c)),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(t.group_of(1001), None);
        assert_eq!(t.overflow.len(), 2, "{:?}", t.overflow);
        // Moving a process to another group rewrites its entry in place.
        track(&mut t, b, 5);
        assert_eq!(t.group_of(b), Some(5));
        untrack(&mut t, b);
        assert_eq!(t.group_of(b), None);
        assert_ne!(
            t.entry(tracked::slot(a)) & tracked::OVERFLOW_BIT,
            0,
            "c still overflows"
        );
        untrack(&mut t, c);
        assert_eq!(
            t.entry(tracked::slot(a)),
            tracked::entry(a, 1),
            "no overflow left: the slot's mark is cleared"
        );
        untrack(&mut t, a);
        assert_eq!(t.group_of(a), None);
        // Untracking something never tracked changes nothing.
        untrack(&mut t, 77);
        assert!(t.slots.values().all(|&e| e == 0) && t.overflow.is_empty());
        // A process that overflowed takes its slot once it is free, and is in one place only.
        track(&mut t, a, 1);
        track(&mut t, b, 2);
        untrack(&mut t, a);
        track(&mut t, b, 2);
        assert_eq!(t.group_of(b), Some(2));
        assert_eq!(tracked::tgid(t.entry(tracked::slot(b))), b);
        assert!(t.overflow.is_empty());
        // A process whose leader exited counts no more switches, and its slot is free at once
        // for a new process (the exit probe marks it; the fork probe and the agent reuse it).
        let slot = tracked::slot(b);
        t.set_entry(slot, t.entry(slot) | tracked::EXITING_BIT);
        assert_eq!(t.group_of(b), None);
        track(&mut t, a, 4);
        assert_eq!(t.group_of(a), Some(4));
        assert!(t.overflow.is_empty(), "{:?}", t.overflow);
        assert_eq!(t.entry(slot) & tracked::EXITING_BIT, 0);
    }

    #[test]
    fn groups_grow_by_their_members_only() {
        let mut t = MemTable::default();
        let mut g = Groups::new(2);
        let kernel = std::cell::RefCell::new(HashMap::<u32, GroupCounters>::new());
        let read = |i: u32| kernel.borrow().get(&i).copied();
        // A worker joins at its start; its group counts from there.
        g.join(&mut t, "a", 10, read);
        let ga = t.group_of(10).unwrap();
        kernel.borrow_mut().insert(ga, counters(100, 1, 9));
        let vms = vec![("a".to_string(), vec![10, 11]), ("b".to_string(), vec![20])];
        let first = g.update(&mut t, &vms, read);
        let gb = t.group_of(20).unwrap();
        assert_ne!(ga, gb);
        assert_eq!(
            t.group_of(11),
            Some(ga),
            "members found by the agent are tracked"
        );
        assert_eq!(first[0].1.cpu_ns, 100);
        assert_eq!(first[1].1.cpu_ns, 0);
        kernel.borrow_mut().insert(ga, counters(400, 3, 9));
        kernel.borrow_mut().insert(gb, counters(7, 0, 0));
        let second = g.update(&mut t, &vms, read);
        assert_eq!(second[0].1.cpu_ns, 300);
        assert_eq!(second[0].1.runq_waits, 2);
        assert_eq!(second[0].1.runq_hist[9], 2);
        assert_eq!(second[1].1.cpu_ns, 7);
        // An entry lost in the kernel (a racing writer) is put back at the next update.
        t.set_entry(tracked::slot(11), 0);
        // 11 leaves "a": untracked, and what it counted stays in "a".
        let vms = vec![("a".to_string(), vec![10]), ("b".to_string(), vec![20])];
        kernel.borrow_mut().insert(ga, counters(450, 3, 9));
        let third = g.update(&mut t, &vms, read);
        assert_eq!(third[0].1.cpu_ns, 50);
        assert_eq!(t.group_of(11), None);
        let vms = vec![("a".to_string(), vec![10, 11]), ("b".to_string(), vec![20])];
        t.set_entry(tracked::slot(11), 0);
        g.update(&mut t, &vms, read);
        assert_eq!(t.group_of(11), Some(ga), "a lost entry comes back");
        // "b" ends; "c" takes its index, counting from what it held then.
        let vms = vec![("a".to_string(), vec![10, 11]), ("c".to_string(), vec![30])];
        let fourth = g.update(&mut t, &vms, read);
        assert_eq!(t.group_of(20), None);
        assert_eq!(t.group_of(30), Some(gb));
        assert_eq!(fourth[1].1.cpu_ns, 0, "c starts from b's last counts");
        // No index is free for a third VM: it is reported, with nothing counted.
        let vms = vec![
            ("a".to_string(), vec![10]),
            ("c".to_string(), vec![30]),
            ("d".to_string(), vec![40]),
        ];
        let fifth = g.update(&mut t, &vms, read);
        assert_eq!(t.group_of(40), None);
        assert_eq!(fifth[2].1, ProbeUsage::default());
    }
}
