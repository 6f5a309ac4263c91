/* Inbound: binds and listen rules. */

#ifndef TETHER_LIB_BIND_H
#define TETHER_LIB_BIND_H

/* Inbound: an agent listens only on loopback or on the ports its listen rules name. */

/* tether_loopback says whether a 16-byte address (IPv4 as ::ffff:a.b.c.d) is loopback. */
static __always_inline int tether_loopback(const __u8 a[16])
{
	__u64 hi, lo;
	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	if (hi == 0 && lo == bpf_cpu_to_be64(1))
		return 1; /* ::1 */
	return hi == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
}

/* tether_listen_rules decides d (a bind or a listener's port) by the agent's listen rules. */
static __always_inline void tether_listen_rules(struct tether_decision *d, void *rules)
{
	struct tether_rule_key key = {};
	int audit_hit = 0;
	__u8 reason = TETHER_REASON_BIND;

	key.prefixlen = 8;
	key.kind = TETHER_RULE_LISTEN;
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	int allowed = v && tether_ports_allow(d, v->ports, v->count, TETHER_MAX_PORT_RULES, &audit_hit, &reason, 1);
	tether_ports_verdict(d, rules, allowed, audit_hit, reason);
}

/* tether_bind decides a bind of the current task to d->addr and d->dport: loopback and port 0
 * (an ephemeral port, as a client takes; a listener on one is caught at ingress) are free. */
static __always_inline int tether_bind(struct tether_decision *d)
{
	if (d->dport == 0 || tether_loopback(d->addr))
		return 1;
	d->kind = TETHER_KIND_BIND;
	void *rules = tether_begin(d);
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return 1; /* not an agent */
	if (rules)
		tether_listen_rules(d, rules);
	tether_account(d);
	if (d->verdict != TETHER_VERDICT_ALLOW || tether_should_emit(d)) {
		struct tether_event *e = tether_event_reserve(d);
		if (e)
			tether_submit(e);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

#endif /* TETHER_LIB_BIND_H */
