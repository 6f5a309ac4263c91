/* Egress rules: hosts, ranges, ports, counted grants, and the inet connect and sendmsg decision. */

#ifndef TETHER_LIB_EGRESS_H
#define TETHER_LIB_EGRESS_H

/* tether_no_match turns "no rule matched" into deny or, in audit mode, a would-deny. */
static __always_inline void tether_no_match(struct tether_decision *d, void *rules, __u8 reason)
{
	struct tether_rule_value *h = tether_header(rules);

	d->reason = reason;
	d->verdict = TETHER_VERDICT_DENY;
	if (h) {
		d->generation = h->generation;
		if (h->mode == TETHER_MODE_AUDIT)
			d->verdict = TETHER_VERDICT_AUDIT;
	}
}

/* tether_entry_match decides on an exec or unix entry that matched: allow, or audit-deny. */
static __always_inline void tether_entry_match(struct tether_decision *d, struct tether_rule_value *v)
{
	if (v->mode == TETHER_MODE_AUDIT) {
		d->verdict = TETHER_VERDICT_AUDIT;
		d->reason = TETHER_REASON_AUDIT_RULE;
		return;
	}
	d->verdict = TETHER_VERDICT_ALLOW;
	d->reason = TETHER_REASON_RULE;
}

static __always_inline int tether_port_rule_match(struct tether_decision *d, struct tether_port_rule *r, __u8 *reason,
						  const int current)
{
	if (r->proto && r->proto != d->proto)
		return 0;
	if (d->dport < r->port_lo || d->dport > r->port_hi)
		return 0;
	if (!(r->flags & TETHER_PORT_RULE_BINARY))
		return 1;
	if (current && d->caller == TETHER_CALLER_CURRENT) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
		d->caller = TETHER_CALLER_NONE;
		if (p) {
			d->caller = TETHER_CALLER_KNOWN;
			d->caller_dev = p->bin_dev;
			d->caller_ino = p->bin_ino;
		}
	}
	if (!current && d->caller == TETHER_CALLER_CURRENT)
		d->caller = TETHER_CALLER_NONE;
	if (d->caller != TETHER_CALLER_KNOWN) {
		*reason = TETHER_REASON_BINARY_UNKNOWN;
		return 0;
	}
	return d->caller_dev == r->bin_dev && d->caller_ino == r->bin_ino;
}

/* tether_take_use takes one use of a counted grant: 1 if it had one left and has not expired. */
static __always_inline int tether_take_use(__u32 grant)
{
	struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &grant);
	if (!u)
		return 0;
	if (u->expires_ns && bpf_ktime_get_boot_ns() >= u->expires_ns)
		return 0;
	if (u->left <= 0)
		return 0; /* used up: not decremented further */
	return __sync_fetch_and_add(&u->left, -1) > 0;
}

/* tether_grant_live says whether a connection a counted grant allowed may go on: until the grant
 * expires (or, for one without expiry, while it has uses left). It takes no use. */
static __always_inline int tether_grant_live(__u32 grant)
{
	struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &grant);
	if (!u)
		return 0;
	if (u->expires_ns)
		return bpf_ktime_get_boot_ns() < u->expires_ns;
	return u->left > 0;
}

/* tether_ports_allow walks a matched prefix's port rules (count of them, at most max): 1 when one
 * allows (d->max_ms is then its max_duration); else 0, with *audit_hit and *reason saying why
 * not. */
static __always_inline int tether_ports_allow(struct tether_decision *d, struct tether_port_rule *ports, __u32 count,
					      const int max, int *audit_hit, __u8 *reason, const int current)
{
	for (int i = 0; i < max; i++) {
		if (i >= count)
			break;
		struct tether_port_rule *r = &ports[i];
		if (!tether_port_rule_match(d, r, reason, current))
			continue;
		if (r->flags & TETHER_PORT_RULE_AUDIT) {
			*audit_hit = 1; /* a rule that allows silently may still follow */
			continue;
		}
		if (r->flags & TETHER_PORT_RULE_COUNTED) {
			int ok = d->recheck ? tether_grant_live(r->grant) : tether_take_use(r->grant);
			if (!ok) {
				*reason = TETHER_REASON_GRANT_SPENT; /* another rule may still allow */
				continue;
			}
		}
		d->max_ms = r->max_ms;
		d->grant = (r->flags & TETHER_PORT_RULE_COUNTED) ? r->grant : 0;
		return 1;
	}
	return 0;
}

/* tether_ports_verdict turns what tether_ports_allow found into d's verdict: allow, audit-deny
 * when only an audit rule matched, else no match for reason. */
static __always_inline void tether_ports_verdict(struct tether_decision *d, void *rules, int allowed, int audit_hit, __u8 reason)
{
	if (allowed) {
		d->verdict = TETHER_VERDICT_ALLOW;
		d->reason = TETHER_REASON_RULE;
	} else if (audit_hit) {
		d->verdict = TETHER_VERDICT_AUDIT;
		d->reason = TETHER_REASON_AUDIT_RULE;
	} else {
		tether_no_match(d, rules, reason);
	}
}

/* tether_mask64 keeps the first keep bits (in byte order) of 8 address bytes read as be. Two
 * halves, not 16 bytes, so that the verifier walks 9 ways through a mask, not 3^16. */
static __always_inline __u64 tether_mask64(__u64 be, int keep)
{
	if (keep >= 64)
		return be;
	if (keep <= 0)
		return 0;
	return bpf_cpu_to_be64(bpf_be64_to_cpu(be) & (~0ULL << (64 - keep)));
}

/* tether_mask copies the first bits bits of the 16-byte address in into out, the rest zero. */
static __always_inline void tether_mask(__u8 out[16], const __u8 in[16], __u32 bits)
{
	__u64 w[2];
	__builtin_memcpy(w, in, 16);
	w[0] = tether_mask64(w[0], (int)bits);
	w[1] = tether_mask64(w[1], (int)bits - 64);
	__builtin_memcpy(out, w, 16);
}

/* tether_host_match looks addr up in tether_hosts at prefixlen: the entry, unless it is missing
 * or retired (below the floor: a rule of an earlier rule set, not yet removed). */
static __always_inline struct tether_host_value *tether_host_match(struct tether_decision *d, __u32 prefixlen)
{
	struct tether_host_key hk = {};
	hk.buf = d->buf;
	hk.prefixlen = prefixlen;
	tether_mask(hk.addr, d->addr, prefixlen - 8);
	struct tether_host_value *h = bpf_map_lookup_elem(&tether_hosts, &hk);
	if (h && h->generation >= d->host_floor)
		return h;
	return NULL;
}

/* tether_egress_rules decides d (a connect, datagram or live socket to d->addr and d->dport) by
 * the rule set in d->buf: by the longest prefix that matches, whether it is in tether_hosts (a
 * host, or the bulk length) or the trie. rules is that rule set, or NULL to look it up only when
 * it is needed (a trie that could hold a longer match, or no match): a host rule that allows
 * decides without it. It returns the rule set (NULL if not looked up, or missing: then denied). */
static __always_inline void *tether_egress_rules(struct tether_decision *d, void *rules, const int current)
{
	int allowed = 0, audit_hit = 0;
	__u8 reason = TETHER_REASON_NO_RULE;
	__u32 len = 8 + 128; /* prefixlen of the tether_hosts match */
	struct tether_host_value *h = tether_host_match(d, len);
	if (!h && d->bulk) {
		len = d->bulk;
		h = tether_host_match(d, len);
	}
	struct tether_rule_value *v = NULL;
	if (d->trie_max && (!h || d->trie_max > len)) {
		if (!rules)
			rules = tether_ruleset(d);
		if (!rules)
			return NULL;
		struct tether_rule_key key = {};
		key.prefixlen = 8 + 128;
		key.kind = TETHER_RULE_EGRESS;
		__builtin_memcpy(key.data, d->addr, 16);
		v = bpf_map_lookup_elem(rules, &key);
		if (v && h && v->mode <= len)
			v = NULL; /* tether_hosts has the longer match */
	}
	if (v)
		allowed = tether_ports_allow(d, v->ports, v->count, TETHER_MAX_PORT_RULES, &audit_hit, &reason, current);
	else if (h)
		allowed = tether_ports_allow(d, h->ports, h->count, TETHER_HOST_PORT_RULES, &audit_hit, &reason, current);
	if (!allowed && !rules)
		rules = tether_ruleset(d);
	if (!allowed && !rules)
		return NULL;
	tether_ports_verdict(d, rules, allowed, audit_hit, reason);
	return rules;
}

/* tether_egress decides a connect or sendmsg of the current task to addr (IPv6 or v4-mapped)
 * and port. */
static __always_inline int tether_egress(struct tether_decision *d)
{
	void *rules = NULL;
	if (tether_begin_agent(d))
		rules = tether_egress_rules(d, NULL, 1);
	return tether_finish(d, rules);
}

static __always_inline void tether_addr4(__u8 addr[16], __u32 ip4_net)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &ip4_net, 4);
}

/* tether_sock_deadline sets when socket s, allowed by the rule d says, must end: its rule's
 * max_duration after its connect (or, for a socket connected under a rule without one, after
 * the first check under a rule with one), or its counted grant's expiry if sooner (so that a connection an
 * approval opened ends with the approval even while tetherd is not there to install the rule set
 * without it). d->buf names the rule set, whose mode says whether the end is enforced. */
static __always_inline void tether_sock_deadline(struct tether_decision *d, struct tether_sock *s)
{
	if (d->max_ms && !s->start_ns)
		s->start_ns = bpf_ktime_get_boot_ns(); /* the first rule with a time limit starts the clock */
	__u64 dl = d->max_ms ? s->start_ns + (__u64)d->max_ms * 1000000 : 0;

	s->flags &= ~(TETHER_SOCK_DEADLINE_GRANT | TETHER_SOCK_DEADLINE_AUDIT | TETHER_SOCK_EXPIRED);
	if (d->grant) {
		__u32 g = d->grant;
		struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &g);
		if (u && u->expires_ns && (!dl || u->expires_ns < dl)) {
			dl = u->expires_ns;
			s->flags |= TETHER_SOCK_DEADLINE_GRANT;
		}
	}
	s->deadline_ns = dl;
	if (!dl)
		return;
	__u32 buf = d->buf;
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
	if (h && h->mode == TETHER_MODE_AUDIT)
		s->flags |= TETHER_SOCK_DEADLINE_AUDIT;
}

/* tether_connected records, in the socket's storage, that an agent connected it under the verdict
 * in d: from now on its packets are judged by it, and checked again whenever the agent's rule set
 * changes. */
static __always_inline void tether_connected(struct bpf_sock_addr *ctx, struct tether_decision *d)
{
	if (d->slot == TETHER_NO_SLOT || d->verdict == TETHER_VERDICT_DENY || !ctx->sk)
		return;
	if (d->proto != IPPROTO_TCP && d->proto != IPPROTO_UDP)
		return;
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		tether_count(TETHER_COUNTER_SOCK_STORAGE_ERRORS);
		return;
	}
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	__u64 bin_ino = d->caller == TETHER_CALLER_KNOWN ? d->caller_ino : 0;
	int timed = d->max_ms || d->grant;
	/* Connected again by the same process under the same rule set (a UDP socket that connects
	 * per request): the storage says it all already. */
	/* The connect's own record stands for an audit-deny of its packets. */
	__u16 flags = TETHER_SOCK_OUTBOUND | TETHER_SOCK_CHECKED | (d->verdict == TETHER_VERDICT_AUDIT ? TETHER_SOCK_REPORTED : 0);
	if (!timed && !s->deadline_ns && s->born == d->born && s->generation == d->generation && s->slot == d->slot &&
	    s->pid == pid && s->verdict == d->verdict && s->reason == d->reason && s->bin_ino == bin_ino && s->flags == flags)
		return;
	s->born = d->born;
	s->generation = d->generation;
	/* The clock of a time limit starts at the connect; without one it is not read (it starts
	 * when a rule with one first applies, see tether_sock_deadline). */
	s->start_ns = timed ? bpf_ktime_get_boot_ns() : 0;
	s->flags = flags;
	tether_sock_deadline(d, s);
	s->bin_dev = d->caller == TETHER_CALLER_KNOWN ? d->caller_dev : 0;
	s->bin_ino = bin_ino;
	s->slot = d->slot;
	s->pid = pid;
	s->verdict = d->verdict;
	s->reason = d->reason;
}

#define TETHER_DNS_PORT 53
#define TETHER_DOT_PORT 853

/* See lib/dns.h: a connect or datagram to port 53 or 853, which the DNS proxy may take. */
static __always_inline int tether_inet_dns(struct bpf_sock_addr *ctx, struct tether_decision *d, int v6);

static __always_inline int tether_inet4(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct tether_decision d = {};

	d.kind = kind;
	d.family = AF_INET;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	tether_addr4(d.addr, ctx->user_ip4);
	if (d.dport == TETHER_DNS_PORT || d.dport == TETHER_DOT_PORT)
		return tether_inet_dns(ctx, &d, 0);
	int ok = tether_egress(&d);
	if (kind == TETHER_KIND_CONNECT4)
		tether_connected(ctx, &d);
	return ok;
}

static __always_inline int tether_inet6(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct tether_decision d = {};
	__u32 *addr = (__u32 *)d.addr;

	d.kind = kind;
	d.family = AF_INET6;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	/* ::ffff:a.b.c.d needs no special case: IPv4 rules are stored in that form. */
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	if (d.dport == TETHER_DNS_PORT || d.dport == TETHER_DOT_PORT)
		return tether_inet_dns(ctx, &d, 1);
	int ok = tether_egress(&d);
	if (kind == TETHER_KIND_CONNECT6)
		tether_connected(ctx, &d);
	return ok;
}

#endif /* TETHER_LIB_EGRESS_H */
