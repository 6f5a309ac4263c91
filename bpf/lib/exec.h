/* Exec: the binary rules, process lineage, and moves between cgroups. */

#ifndef TETHER_LIB_EXEC_H
#define TETHER_LIB_EXEC_H

/* The change time of an inode in nanoseconds: a write, a truncate, a chmod or a rename of the file
 * sets it. Its field moved twice (6.6, 6.11); these flavours read it on each kernel. */
struct inode___v611 {
	time64_t i_ctime_sec;
	u32 i_ctime_nsec;
} __attribute__((preserve_access_index));
struct inode___v66 {
	struct timespec64 __i_ctime;
} __attribute__((preserve_access_index));
struct inode___v61 {
	struct timespec64 i_ctime;
} __attribute__((preserve_access_index));

static __always_inline __u64 tether_ctime(struct inode *inode)
{
	struct inode___v611 *a = (void *)inode;
	struct inode___v66 *b = (void *)inode;
	struct inode___v61 *c = (void *)inode;
	/* Since 6.13 the top bit of i_ctime_nsec says that the time was queried (multigrain
	 * timestamps); nanoseconds never reach it. */
	if (bpf_core_field_exists(a->i_ctime_sec))
		return (__u64)BPF_CORE_READ(a, i_ctime_sec) * 1000000000ULL + (BPF_CORE_READ(a, i_ctime_nsec) & 0x7fffffff);
	if (bpf_core_field_exists(b->__i_ctime))
		return (__u64)BPF_CORE_READ(b, __i_ctime.tv_sec) * 1000000000ULL + BPF_CORE_READ(b, __i_ctime.tv_nsec);
	return (__u64)BPF_CORE_READ(c, i_ctime.tv_sec) * 1000000000ULL + BPF_CORE_READ(c, i_ctime.tv_nsec);
}

/* tether_exec_decide decides an exec of the file bprm->file by the current task, in an agent or
 * too deep below an agent parent to tell (then d->slot is TETHER_NO_SLOT and the verdict deny).
 * A granted file counts only while its change time is the one granted: a file rewritten in place
 * (same inode) is denied for modified-file until tetherd has checked its digest and granted it
 * again. */
static __always_inline void tether_exec_decide(struct tether_decision *d, struct linux_binprm *bprm,
					       void **rules_out)
{
	d->kind = TETHER_KIND_EXEC;
	void *rules = tether_begin(d);
	*rules_out = rules;
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return;

	struct file *file = BPF_CORE_READ(bprm, file);
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	d->bin_dev = BPF_CORE_READ(inode, i_sb, s_dev);
	d->bin_ino = BPF_CORE_READ(inode, i_ino);
	if (!rules)
		return;

	struct tether_rule_key key = {};
	key.prefixlen = 8 + 8 * 12;
	key.kind = TETHER_RULE_EXEC;
	__builtin_memcpy(key.data, &d->bin_dev, 4);
	__builtin_memcpy(key.data + 4, &d->bin_ino, 8);
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	if (!v) {
		tether_no_match(d, rules, TETHER_REASON_NO_RULE);
		return;
	}
	if (v->generation != tether_ctime(inode)) {
		tether_no_match(d, rules, TETHER_REASON_MODIFIED_FILE);
		return;
	}
	tether_entry_match(d, v);
}

/* tether_unresolved_root says whether an exec no rule allows comes from a container cgroup of a
 * pod agent whose root tetherd has not resolved the exec rules in yet (see
 * TETHER_REASON_UNRESOLVED_ROOT), and then gives d that reason. */
static __always_inline int tether_unresolved_root(struct tether_decision *d)
{
	if (d->slot == TETHER_NO_SLOT || d->reason != TETHER_REASON_NO_RULE)
		return 0;
	__u32 slot = d->slot;
	struct tether_agent *a = bpf_map_lookup_elem(&tether_agents, &slot);
	if (!a || !(a->flags & TETHER_AGENT_CONTAINERS))
		return 0;
	__u64 id = d->cgroup_id;
	struct tether_root *r = bpf_map_lookup_elem(&tether_roots, &id);
	if (r && r->born == d->born)
		return 0;
	d->reason = TETHER_REASON_UNRESOLVED_ROOT;
	return 1;
}

static __always_inline void tether_exec_event(struct tether_decision *d, void *rules,
					      struct linux_binprm *bprm)
{
	tether_account(d);
	if (!tether_should_emit(d))
		return;
	if (d->generation == 0 && rules) {
		struct tether_rule_value *h = tether_header(rules);
		if (h)
			d->generation = h->generation;
	}
	struct tether_event *e = tether_event_reserve(d);
	if (!e)
		return;
	bpf_probe_read_kernel_str(e->target, sizeof(e->target), BPF_CORE_READ(bprm, filename));
	tether_submit(e);
}

/* tether_live_agent returns the agent a lineage entry belongs to while it is still that agent
 * (the slot has not been cleared or given to another), else NULL. */
static __always_inline struct tether_agent *tether_live_agent(struct tether_proc *p)
{
	__u32 slot = p->slot;
	struct tether_agent *a = bpf_map_lookup_elem(&tether_agents, &slot);
	if (!a || a->born != p->born || !(a->flags & TETHER_AGENT_ACTIVE))
		return NULL;
	return a;
}

/* tether_exec_lineage records the binary an agent process now runs: 0, or -1 when tether_procs
 * has no room for it. */
static __always_inline int tether_exec_lineage(struct task_struct *task, __u32 slot,
						struct linux_binprm *bprm, struct tether_decision *d)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	struct tether_proc *old = bpf_map_lookup_elem(&tether_procs, &tgid);
	struct tether_proc p = {};

	if (old) {
		p.ppid = old->ppid;
		p.start_ns = old->start_ns;
		p.mnt_ns = old->slot == slot && old->born == d->born ? old->mnt_ns : 0;
	} else {
		p.ppid = BPF_CORE_READ(task, real_parent, tgid);
		p.start_ns = bpf_ktime_get_boot_ns();
	}
	if (!p.mnt_ns)
		p.mnt_ns = tether_mnt_ns(); /* the first exec in the agent: its namespace is the agent's */
	p.slot = slot;
	p.born = d->born;
	p.bin_dev = d->bin_dev;
	p.bin_ino = d->bin_ino;
	bpf_get_current_comm(p.comm, sizeof(p.comm));
	bpf_probe_read_kernel_str(p.path, sizeof(p.path), BPF_CORE_READ(bprm, filename));
	if (bpf_map_update_elem(&tether_procs, &tgid, &p, BPF_ANY)) {
		tether_count(TETHER_COUNTER_LINEAGE_UPDATE_ERRORS);
		return -1;
	}
	return 0;
}

/* tether_migrated records that the agent process tgid (lineage p) is found outside its agent
 * and, unless its agent is in audit mode, kills it: the current task when it is that process,
 * else through bpf_send_signal_task where the kernel has it (6.13+), else tetherd does on the
 * record. target names where it went. Returns 1 when it was signalled. */
static __always_inline int tether_migrated(struct task_struct *task, struct tether_proc *p, struct tether_agent *agent,
					   __u64 cgroup_id, const char *where, int late)
{
	struct tether_decision d = {};
	__u32 tgid = BPF_CORE_READ(task, tgid);
	int signalled = 0;

	d.kind = TETHER_KIND_MIGRATE;
	d.slot = p->slot;
	d.cgroup_id = cgroup_id;
	d.bin_dev = p->bin_dev;
	d.bin_ino = p->bin_ino;
	d.reason = TETHER_REASON_MIGRATION;
	d.verdict = TETHER_VERDICT_DENY;
	__u32 active = agent->active & 1, buf = p->slot * 2 + active;
	d.generation = agent->generation[active];
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
	if (h && h->mode == TETHER_MODE_AUDIT && !(agent->flags & TETHER_AGENT_KILLED))
		d.verdict = TETHER_VERDICT_AUDIT;
	if (late)
		tether_count(TETHER_COUNTER_MIGRATIONS_LATE);
	if (d.verdict == TETHER_VERDICT_DENY) {
		if ((__u32)(bpf_get_current_pid_tgid() >> 32) == tgid)
			signalled = bpf_send_signal(SIGKILL) == 0;
		else if (bpf_ksym_exists(bpf_send_signal_task))
			signalled = bpf_send_signal_task(task, SIGKILL, PIDTYPE_TGID, 0) == 0;
		if (!signalled)
			tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
	}
	tether_account(&d);
	struct tether_event *e = bpf_ringbuf_reserve(&tether_events, sizeof(*e), 0);
	if (!e) {
		tether_count(TETHER_COUNTER_RINGBUF_DROPS);
		return signalled;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->generation = d.generation;
	e->cgroup_id = cgroup_id;
	e->slot = d.slot;
	e->pid = tgid;
	/* tid: the process that moved it (itself, or another); its tetherd-side kill needs to
	 * know whether the kernel already did. */
	e->tid = bpf_get_current_pid_tgid() >> 32;
	e->uid = BPF_CORE_READ(task, cred, uid.val);
	e->kind = d.kind;
	e->verdict = d.verdict;
	e->reason = d.reason;
	e->proto = signalled;
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	tether_event_lineage(e, 1);
	if (where)
		bpf_probe_read_kernel_str(e->target, sizeof(e->target), where);
	tether_submit(e);
	return signalled;
}

/* tether_cgroup_in_slot says whether the nearest bound cgroup of cg and its ancestors (64 levels
 * at most: a move is rare, and a move deep below its own agent is no migration) is slot's. */
static __always_inline int tether_cgroup_in_slot(struct cgroup *cg, __u32 slot)
{
	__u32 found = TETHER_NO_SLOT;
	return tether_cgroup_slot(cg, &found, 64) && found == slot;
}

#endif /* TETHER_LIB_EXEC_H */
