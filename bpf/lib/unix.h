/* Unix socket rules: the address as a rule key, the caller's mount namespace. */

#ifndef TETHER_LIB_UNIX_H
#define TETHER_LIB_UNIX_H

/* tether_unix_key fills key->data from the n sun_path bytes the caller passed: a pathname up to its
 * first NUL (the kernel reads no further), or an abstract name as NUL, length, name bytes (its
 * length is part of its identity). It returns 0 when the address may not match any rule: none
 * given, or a pathname with a ".." component, which could climb out of a directory that a prefix
 * rule allows. */
static __always_inline int tether_unix_key(struct tether_rule_key *key, const char *path, __u64 n)
{
	if (n == 0)
		return 0;
	if (n > TETHER_UNIX_PATH_LEN)
		n = TETHER_UNIX_PATH_LEN;
	tether_barrier_var(n);
	char first = 0;
	if (bpf_probe_read_kernel(&first, 1, path))
		return 0;

	if (first == 0) {
		__u64 len = n - 1;
		if (len > TETHER_UNIX_PATH_LEN - 1)
			len = TETHER_UNIX_PATH_LEN - 1;
		tether_barrier_var(len);
		key->data[1] = len;
		if (len && bpf_probe_read_kernel(&key->data[2], len, path + 1))
			return 0;
		return 1;
	}

	/* Reads at most n + 1 bytes and turns the last one into a NUL: the kernel reads n bytes up
	 * to the first NUL. The byte past the caller's address is never used. */
	if (bpf_probe_read_kernel_str(key->data, n + 1, path) < 0)
		return 0;

	/* w holds the last three bytes; a leading '/' makes a leading ".." count too. */
	__u32 w = '/';
	for (int i = 0; i < TETHER_UNIX_PATH_LEN; i++) {
		__u8 c = key->data[i];
		if ((w & 0xffffff) == ('/' << 16 | '.' << 8 | '.') && (c == '/' || c == 0))
			return 0;
		if (c == 0)
			break;
		w = w << 8 | c;
	}
	return 1;
}

static __always_inline void tether_unix_target(char target[TETHER_PATH_LEN], struct tether_rule_key *key)
{
	if (key->data[0]) {
		__builtin_memcpy(target, key->data, TETHER_RULE_DATA);
		return;
	}
	/* Abstract: '@' then the name; NUL bytes inside the name stay NUL. */
	target[0] = '@';
	__builtin_memcpy(target + 1, &key->data[2], TETHER_RULE_DATA - 2);
}

/* tether_mnt_ns is the inode number of the current task's mount namespace. */
static __always_inline __u32 tether_mnt_ns(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	return BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
}

/* tether_other_mnt_ns says whether the current process runs in another mount namespace than its
 * agent's (its lineage's): there, a socket path may name another socket than the one granted. */
static __always_inline int tether_other_mnt_ns(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
	/* An agent process with no lineage (tether_procs was full when it forked, on a kernel that
	 * cannot kill it then) has no namespace known to be the agent's: taken to be elsewhere. */
	if (!p)
		return 1;
	return p->mnt_ns && p->mnt_ns != tether_mnt_ns();
}

/* tether_unix_decide decides a connect or send to the unix address whose n sun_path bytes are at
 * path; d carries the kind and socket type. It returns 1 to allow, 0 to deny. global is set for
 * the LSM programs, which run for every process of the host: outside agents they only allow. */
static __always_inline int tether_unix_decide(struct tether_decision *d, const char *path, __u64 n, int global)
{
	struct tether_rule_key key = {};
	void *rules;

	d->family = AF_UNIX;
	key.kind = TETHER_RULE_UNIX;
	key.prefixlen = 8 + 8 * TETHER_RULE_DATA;
	int matchable = tether_unix_key(&key, path, n);

	rules = tether_begin(d);
	if (global && d->slot == TETHER_NO_SLOT && !(d->reason == TETHER_REASON_DEPTH && tether_under_parent()))
		return 1;
	if (rules) {
		struct tether_rule_value *v = matchable ? bpf_map_lookup_elem(rules, &key) : NULL;
		if (!v)
			tether_no_match(d, rules, TETHER_REASON_NO_RULE);
		else if (key.data[0] && tether_other_mnt_ns())
			tether_no_match(d, rules, TETHER_REASON_MOUNT_NS); /* a pathname, not an abstract name */
		else
			tether_entry_match(d, v);
	}

	tether_account(d);
	if (!tether_should_emit(d))
		return d->verdict != TETHER_VERDICT_DENY;
	if (d->generation == 0 && rules) {
		struct tether_rule_value *h = tether_header(rules);
		if (h)
			d->generation = h->generation;
	}
	struct tether_event *e = tether_event_reserve(d);
	if (e) {
		tether_unix_target(e->target, &key);
		tether_submit(e);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

static __always_inline int tether_unix(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct bpf_sock_addr_kern *sa = bpf_cast_to_kern_ctx(ctx);
	struct tether_decision d = {};
	__u64 len = sa->uaddrlen;

	d.kind = kind;
	d.sock_type = ctx->type;
	/* offsetof(struct sockaddr_un, sun_path) is 2 */
	return tether_unix_decide(&d, (const char *)sa->uaddr + 2, len > 2 ? len - 2 : 0, 0);
}

#endif /* TETHER_LIB_UNIX_H */
