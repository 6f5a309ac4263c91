package tether_test

import data.tether

req(r) := object.union(ctx(task("coding", "internal"), dev, morning), {"request": r})

test_allow_follows_grants if {
	tether.allow with input as req({"kind": "connect", "ip": "10.1.2.3", "port": 443, "protocol": "tcp"})
	not tether.allow with input as req({"kind": "connect", "ip": "10.1.2.3", "port": 80, "protocol": "tcp"})
	tether.allow with input as req({"kind": "dns", "name": "api.github.com"})
	tether.allow with input as req({"kind": "dns", "name": "files.pythonhosted.org"})
	not tether.allow with input as req({"kind": "dns", "name": "c2VjcmV0.exfil.example.org"})
	not tether.allow with input as req({"kind": "connect", "ip": "8.8.8.8", "port": 443, "protocol": "tcp"})
	tether.allow with input as req({"kind": "exec", "path": "/usr/bin/git"})
	not tether.allow with input as req({"kind": "exec", "path": "/usr/bin/bash"})
}

test_allow_dns_names if {
	profiles := {"d": {"exec": [], "high_risk": [], "unix": [], "egress": [{"fqdn": "api.example.com", "ports": [443]}, {"fqdn": "*.cdn.example.net"}]}}
	i := ctx(task("d", "public"), dev, morning)
	allowed := {n |
		some n in ["api.example.com", "API.example.com.", "x.api.example.com", "a.cdn.example.net", "a.b.cdn.example.net", "cdn.example.net", "evil.example.org"]
		tether.allow with input as object.union(i, {"request": {"kind": "dns", "name": n}}) with data.tether_settings.profiles as profiles
	}
	allowed == {"api.example.com", "API.example.com.", "a.cdn.example.net", "a.b.cdn.example.net"}
}

test_allow_everything_in_audit_mode if {
	a := object.union(agent("spiffe://example.org/agents/a"), {"labels": {"tether.dev/mode": "audit"}})
	tether.allow with input as {"agent": a, "env": dev, "time": morning, "request": {"kind": "exec", "path": "/usr/bin/bash"}}
}

test_allow_port_ranges if {
	profiles := {"r": {"exec": [], "high_risk": [], "unix": [], "egress": [{"cidr": "192.0.2.0/24", "ports": ["8000-8100"], "protocol": "any"}]}}
	i := object.union(ctx(task("r", "public"), dev, morning), {"request": {"kind": "connect", "ip": "192.0.2.9", "port": 8050, "protocol": "udp"}})
	tether.allow with input as i with data.tether_settings.profiles as profiles
	j := object.union(i, {"request": {"kind": "connect", "ip": "192.0.2.9", "port": 8101, "protocol": "udp"}})
	not tether.allow with input as j with data.tether_settings.profiles as profiles
}

test_allow_single_addresses if {
	profiles := {"a": {"exec": [], "high_risk": [], "unix": [], "egress": [{"cidr": "192.0.2.7", "ports": [53]}, {"cidr": "2001:db8::7", "ports": [53]}]}}
	i := ctx(task("a", "public"), dev, morning)
	allowed := {ip |
		some ip in ["192.0.2.7", "192.0.2.8", "2001:db8::7", "2001:db8::8"]
		tether.allow with input as object.union(i, {"request": {"kind": "connect", "ip": ip, "port": 53, "protocol": "udp"}}) with data.tether_settings.profiles as profiles
	}
	allowed == {"192.0.2.7", "2001:db8::7"}
}

test_allow_unix_paths if {
	profiles := {"u": {"exec": [], "high_risk": [], "egress": [], "unix": ["/run/app.sock", "/run/tools/*", "@bus"]}}
	i := ctx(task("u", "public"), dev, morning)
	allowed := {p |
		some p in ["/run/app.sock", "/run/app.sock2", "/run/tools/a", "/run/tools/a/b", "/run/tools", "@bus", "@bus2", "/run/toolsx/a", "/run/tools/../app.sock", "/run/tools/a/..", "@bus/.."]
		tether.allow with input as object.union(i, {"request": {"kind": "unix", "path": p}}) with data.tether_settings.profiles as profiles
	}
	allowed == {"/run/app.sock", "/run/tools/a", "/run/tools/a/b", "@bus"}
}

test_stepup_production_needs_approval if {
	d := tether.stepup with input as object.union(ctx(task("incident-response", "internal"), prod, morning), {"request": {"action": "connect", "resource": "production", "reason": "outage"}})
	d.allowed
	d.needs_approval
	d.ttl == "15m"
}

test_stepup_restricted_refused if {
	d := tether.stepup with input as object.union(ctx(task("coding", "restricted"), dev, morning), {"request": {"action": "connect", "resource": "git_hosting", "reason": "push"}})
	not d.allowed
}

test_stepup_unknown_refused if {
	d := tether.stepup with input as object.union(ctx(task("coding", "internal"), dev, morning), {"request": {"action": "format-disk", "resource": "/", "reason": "x"}})
	not d.allowed
	not d.needs_approval
}

ev(kind, verdict, dest, ts) := {"decision_id": concat("-", [kind, dest, ts]), "kind": kind, "verdict": verdict, "destination": dest, "timestamp": ts}

test_respond_kill_on_metadata if {
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": ev("connect4", "deny", "169.254.169.254:80", "2026-11-25T10:30:00Z")})
	r == "kill"
}

test_respond_freeze_on_three_denials_in_a_minute if {
	recent := [ev("connect4", "deny", "192.0.2.1:443", "2026-11-25T10:29:40Z"), ev("connect4", "deny", "192.0.2.2:443", "2026-11-25T10:29:50Z")]
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": ev("connect4", "deny", "192.0.2.3:443", "2026-11-25T10:30:00Z"), "recent": recent})
	r == "freeze"
}

test_respond_old_denials_do_not_count if {
	recent := [ev("connect4", "deny", "192.0.2.1:443", "2026-11-25T10:20:00Z"), ev("connect4", "deny", "192.0.2.2:443", "2026-11-25T10:21:00Z")]
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": ev("connect4", "deny", "192.0.2.3:443", "2026-11-25T10:30:00Z"), "recent": recent})
	r == "none"
}

test_respond_freeze_counts_every_denial if {
	base := object.union(ctx(null, dev, morning), {"event": ev("connect4", "deny", "192.0.2.3:443", "2026-11-25T10:30:00Z")})
	i := object.union(base, {"counts": {"connect4/deny": 2, "sendmsg6/deny": 1, "exec/deny": 5}})
	tether.respond == "freeze" with input as i
	tether.respond == "none" with input as object.union(base, {"counts": {"connect4/deny": 2, "exec/deny": 5}})
	tether.respond == "none" with input as i with data.tether_settings.respond.freeze_after_denied_egress as 4
}

test_respond_alert_on_a_detour if {
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": {"decision_id": "x", "kind": "sockopt", "verdict": "deny", "reason": "detour", "timestamp": "2026-11-25T10:30:00Z"}})
	r == "alert"
	tether.respond == "none" with input as object.union(ctx(null, dev, morning), {"event": {"decision_id": "x", "kind": "terminate", "verdict": "deny", "reason": "revoked", "timestamp": "2026-11-25T10:30:00Z"}})
}

test_respond_alert_on_a_refused_syscall if {
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": {"decision_id": "x", "kind": "syscall", "syscall": "bpf", "verdict": "deny", "reason": "sandbox-strict: EPERM", "timestamp": "2026-11-25T10:30:00Z"}})
	r == "alert"
}

test_respond_alert_on_denied_exec if {
	r := tether.respond with input as object.union(ctx(null, dev, morning), {"event": {"decision_id": "x", "kind": "exec", "verdict": "deny", "timestamp": "2026-11-25T10:30:00Z"}})
	r == "alert"
}

test_stepup_handoff_follows_the_profile if {
	profiles := {"lead": {"exec": [], "high_risk": [], "unix": [], "egress": [], "handoff_to": ["spiffe://example.org/agents/helper-*"]}}
	i := ctx(task("lead", "internal"), dev, morning)
	d := tether.stepup with input as object.union(i, {"request": {"action": "handoff", "resource": "spiffe://example.org/agents/helper-1"}}) with data.tether_settings.profiles as profiles
	d.allowed
	not d.needs_approval
	e := tether.stepup with input as object.union(i, {"request": {"action": "handoff", "resource": "spiffe://example.org/agents/other"}}) with data.tether_settings.profiles as profiles
	not e.allowed
	f := tether.stepup with input as object.union(i, {"request": {"action": "handoff", "resource": "spiffe://example.org/agents/helper-1/sub"}}) with data.tether_settings.profiles as profiles
	not f.allowed
}

test_stepup_handoff_refused_without_handoff_to if {
	d := tether.stepup with input as object.union(ctx(task("coding", "internal"), dev, morning), {"request": {"action": "handoff", "resource": "spiffe://example.org/agents/a"}})
	not d.allowed
}

test_respond_freeze_after_is_a_setting if {
	recent := [ev("connect4", "deny", "192.0.2.1:443", "2026-11-25T10:29:40Z"), ev("connect4", "deny", "192.0.2.2:443", "2026-11-25T10:29:50Z")]
	i := object.union(ctx(null, dev, morning), {"event": ev("connect4", "deny", "192.0.2.3:443", "2026-11-25T10:30:00Z"), "recent": recent})
	tether.respond == "freeze" with input as i
	tether.respond == "none" with input as i with data.tether_settings.respond.freeze_after_denied_egress as 0
	tether.respond == "none" with input as i with data.tether_settings.respond.freeze_after_denied_egress as 4
}

test_allow_bind_loopback_only_by_default if {
	tether.allow with input as req({"kind": "bind", "ip": "127.0.0.1", "port": 8080, "protocol": "tcp"})
	tether.allow with input as req({"kind": "bind", "ip": "::1", "port": 8080, "protocol": "tcp"})
	not tether.allow with input as req({"kind": "bind", "ip": "0.0.0.0", "port": 8080, "protocol": "tcp"})
	tether.allow with input as req({"kind": "bind", "ip": "0.0.0.0", "protocol": "tcp"})
}

test_profile_listen_and_pinned_exec if {
	profiles := {"p": {"exec": ["/usr/bin/git", {"path": "/opt/tool", "sha256": "ab"}, {"sha256": "cd"}], "high_risk": [], "unix": [], "egress": [], "listen": [{"ports": [8080], "protocol": "tcp"}]}}
	g := tether.grants with input as ctx(task("p", "public"), dev, morning) with data.tether_settings.profiles as profiles
	g.listen == [{"ports": [8080], "protocol": "tcp"}]
	g.exec == [{"path": "/usr/bin/git"}, {"path": "/opt/tool", "sha256": "ab"}, {"sha256": "cd"}]
	h := tether.grants with input as req({"kind": "exec"})
	not h.listen
}

test_allow_bind_by_listen_rules if {
	g := {"mode": "enforce", "listen": [{"ports": ["8000-8100"], "protocol": "tcp"}]}
	tether.allow with input as req({"kind": "bind", "ip": "0.0.0.0", "port": 8050, "protocol": "tcp"}) with data.tether.grants as g
	not tether.allow with input as req({"kind": "bind", "ip": "0.0.0.0", "port": 8050, "protocol": "udp"}) with data.tether.grants as g
	not tether.allow with input as req({"kind": "bind", "ip": "0.0.0.0", "port": 9000, "protocol": "tcp"}) with data.tether.grants as g
}

test_allow_exec_by_digest if {
	g := {"mode": "enforce", "exec": [{"path": "/usr/bin/tool", "sha256": "ab"}]}
	tether.allow with input as req({"kind": "exec", "path": "/usr/bin/tool", "sha256": "ab"}) with data.tether.grants as g
	not tether.allow with input as req({"kind": "exec", "path": "/usr/bin/tool", "sha256": "cd"}) with data.tether.grants as g
	any := {"mode": "enforce", "exec": [{"sha256": "ab"}]}
	tether.allow with input as req({"kind": "exec", "path": "/tmp/anything", "sha256": "ab"}) with data.tether.grants as any
	not tether.allow with input as req({"kind": "exec", "path": "/tmp/anything", "sha256": "cd"}) with data.tether.grants as any
}
