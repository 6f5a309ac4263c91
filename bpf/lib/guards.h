/* Guards only BPF LSM can place, and the unix peer checks of the LSM hooks. */

#ifndef TETHER_LIB_GUARDS_H
#define TETHER_LIB_GUARDS_H

/* Guards that only BPF LSM can place: they refuse, for agents, what no cgroup hook sees. Each runs
 * for every process of the host and costs a process outside the agent parents a helper call per
 * parent. */

/* tether_guard_decide finds the current task's agent for an LSM guard: 1 with d filled in (a deny,
 * or audit-deny in audit mode, for reason) when the guard applies to it, 0 when the task is in no
 * agent. */
static __always_inline int tether_guard_decide(struct tether_decision *d, __u8 kind, __u8 reason)
{
	if (!tether_under_parent())
		return 0;
	d->kind = kind;
	void *rules = tether_begin(d);
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return 0;
	if (rules)
		tether_no_match(d, rules, reason);
	else if (d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_DEPTH)
		d->reason = reason;
	return 1;
}

/* tether_guard_finish records d (target names what was refused) and returns the hook's answer. */
static __always_inline int tether_guard_finish(struct tether_decision *d, const char *target)
{
	tether_account(d);
	struct tether_event *e = tether_event_reserve(d);
	if (e) {
		if (target)
			bpf_probe_read_kernel_str(e->target, sizeof(e->target), target);
		tether_submit(e);
	}
	return d->verdict == TETHER_VERDICT_DENY ? -EPERM : 0;
}

/* tether_unix_dir_match looks the peer socket file dentry up among the rule set's unix directory
 * entries: its directory with its name (an exact path rule), or its directory or one of theirs
 * above it (a prefix rule, "/dir/" then "*"). */
static __always_inline struct tether_rule_value *tether_unix_dir_match(void *rules, struct dentry *dentry)
{
	struct tether_rule_key key = {};
	__u32 dev = BPF_CORE_READ(dentry, d_sb, s_dev);
	struct dentry *dir = BPF_CORE_READ(dentry, d_parent);
	__u64 ino = BPF_CORE_READ(dir, d_inode, i_ino);

	key.kind = TETHER_RULE_UNIX_DIR;
	__builtin_memcpy(key.data, &dev, 4);
	__builtin_memcpy(key.data + 4, &ino, 8);
	int n = bpf_probe_read_kernel_str(key.data + 12, TETHER_RULE_DATA - 12, BPF_CORE_READ(dentry, d_name.name));
	key.prefixlen = 8 + 8 * (12 + (n > 0 ? n : 0)); /* the NUL included: an exact name */
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	if (v)
		return v;
	__builtin_memset(key.data + 12, 0, TETHER_RULE_DATA - 12);
	key.prefixlen = 8 + 8 * 12;
	for (int i = 0; i < TETHER_MAX_ANCESTORS; i++) {
		struct dentry *up = BPF_CORE_READ(dir, d_parent);
		if (up == dir)
			break; /* the root of its file system */
		dir = up;
		ino = BPF_CORE_READ(dir, d_inode, i_ino);
		__builtin_memcpy(key.data + 4, &ino, 8);
		v = bpf_map_lookup_elem(rules, &key);
		if (v)
			return v;
	}
	return NULL;
}

/* tether_unix_peer decides, under BPF LSM, a connect or send of the current task to the unix
 * socket other by the file it is bound to: a granted path counts only while it leads to the
 * granted socket file (or below a granted directory), whatever the agent's view of the path (a
 * mount over it, in its namespace or another). Abstract and unbound peers are the string hooks'. */
static __always_inline int tether_unix_peer(struct sock *other, __u8 kind, int sock_type)
{
	struct tether_decision d = {};
	struct unix_sock *u = (struct unix_sock *)other;
	struct dentry *dentry = BPF_CORE_READ(u, path.dentry);

	if (!dentry || !tether_under_parent())
		return 0;
	d.kind = kind;
	d.family = AF_UNIX;
	d.sock_type = sock_type;
	void *rules = tether_begin(&d);
	if (d.slot == TETHER_NO_SLOT && d.reason != TETHER_REASON_DEPTH)
		return 0;
	if (rules) {
		struct tether_rule_value *v = tether_unix_dir_match(rules, dentry);
		if (!v)
			tether_no_match(&d, rules, TETHER_REASON_MOUNT_NS);
		else
			tether_entry_match(&d, v);
	}
	if (d.verdict == TETHER_VERDICT_ALLOW) {
		tether_account(&d);
		return 0; /* the string hook has recorded the allow, sampled */
	}
	return tether_guard_finish(&d, (const char *)BPF_CORE_READ(dentry, d_name.name));
}

#endif /* TETHER_LIB_GUARDS_H */
