package tether_test

import data.tether

# A weekday morning in UTC.
morning := {"now": "2026-11-25T10:30:00Z", "weekday": "Wednesday", "hour": 10, "timezone": "UTC"}

# A Saturday night.
night := {"now": "2026-11-28T23:15:00Z", "weekday": "Saturday", "hour": 23, "timezone": "UTC"}

agent(id) := {"spiffe_id": id, "trust_domain": "example.org", "path": "/agents/a", "selectors": [], "labels": {}}

ctx(task, env, t) := {"agent": agent("spiffe://example.org/agents/a"), "task": task, "env": env, "time": t}

task(type, sensitivity) := {
	"id": "t1", "type": type, "sensitivity": sensitivity,
	"started_at": "2026-11-25T10:00:00Z", "expires_at": "2026-11-25T12:00:00Z", "approvals": [],
}

dev := {"node": "n1", "environment": "development"}

prod := {"node": "n1", "environment": "production"}

egress_to(g, network) := {r | some r in g.egress; goes_to(r, network)}

goes_to(r, network) if r.cidrs == data.tether_settings.networks[network]

goes_to(r, network) if r.fqdn in data.tether_settings.services[network]

test_deny_by_default if {
	g := tether.grants with input as {"agent": agent("spiffe://example.org/nobody"), "env": dev, "time": morning}
	g == {"mode": "enforce", "egress": [], "exec": [], "exec_deny": tether.exec_deny, "unix": [], "sandbox": "default", "max_lifetime": "8h"}
}

test_sandbox_and_lifetime_from_the_profile if {
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
		with data.tether_settings.profiles.coding.sandbox as "strict"
		with data.tether_settings.profiles.coding.max_lifetime as "2h"
	g.sandbox == "strict"
	g.max_lifetime == "2h"
}

test_unknown_task_type_gets_nothing if {
	g := tether.grants with input as ctx(task("mining", "public"), dev, morning)
	count(g.egress) == 0
	count(g.exec) == 0
}

test_coding_gets_git_and_registries if {
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
	count(egress_to(g, "git_hosting")) > 0
	count(egress_to(g, "package_registries")) > 0
	{"path": "/usr/bin/git"} in g.exec
}

test_public_services_by_name if {
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
	names := {r.fqdn | some r in egress_to(g, "package_registries")}
	names == {n | some n in data.tether_settings.services.package_registries}
	every r in egress_to(g, "git_hosting") {
		not r.cidrs
		r.ports == [22, 443]
	}
}

test_only_git_reaches_git_hosting if {
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
	every r in egress_to(g, "git_hosting") {
		r.binary == "/usr/bin/git"
	}
}

test_high_risk_tools_denied_unless_granted if {
	# coding grants interpreters, not shells or network tools
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
	{"path": "/usr/bin/python3"} in g.exec
	not {"path": "/usr/bin/bash"} in g.exec
	not {"path": "/usr/bin/curl"} in g.exec
}

test_profile_cannot_sneak_in_a_high_risk_tool if {
	profiles := object.union(data.tether_settings.profiles, {"sneaky": {"exec": ["/usr/bin/curl", "/usr/bin/git"], "high_risk": [], "egress": [], "unix": []}})
	g := tether.grants with input as ctx(task("sneaky", "public"), dev, morning)
		with data.tether_settings.profiles as profiles
	g.exec == [{"path": "/usr/bin/git"}]
}

test_a_glob_covering_a_high_risk_tool_is_not_granted if {
	profiles := object.union(data.tether_settings.profiles, {"globs": {"exec": ["/usr/bin/*", "/usr/bin/c*", "/opt/tools/*"], "high_risk": [], "egress": [], "unix": []}})
	g := tether.grants with input as ctx(task("globs", "public"), dev, morning)
		with data.tether_settings.profiles as profiles
	g.exec == [{"path": "/opt/tools/*"}]
}

test_incident_response_gets_shells_and_cloud_clis if {
	g := tether.grants with input as ctx(task("incident-response", "internal"), dev, morning)
	{"path": "/usr/bin/bash"} in g.exec
	{"path": "/usr/bin/kubectl"} in g.exec
}

test_restricted_data_gets_no_internet if {
	g := tether.grants with input as ctx(task("coding", "restricted"), dev, morning)
	count(egress_to(g, "git_hosting")) == 0
	count(egress_to(g, "package_registries")) == 0
	count(egress_to(g, "internal")) > 0
}

test_production_needs_approved_stepup if {
	g := tether.grants with input as ctx(task("incident-response", "internal"), prod, morning)
	count(egress_to(g, "production")) == 0
	t := object.union(task("incident-response", "internal"), {"approvals": [{"id": "a1", "action": "connect", "resource": "production", "expires_at": "2026-11-25T11:00:00Z", "approved_by": "uid:0"}]})
	g2 := tether.grants with input as ctx(t, prod, morning)
	count(egress_to(g2, "production")) > 0
	every r in egress_to(g2, "production") {
		r.approval == "a1" # the kernel counts the approval's uses on it
	}

	# Two approvals: a rule for each, each counted on its own.
	t3 := object.union(t, {"approvals": array.concat(t.approvals, [{"id": "a2", "action": "connect", "resource": "production", "expires_at": "2026-11-25T11:00:00Z"}])})
	g3 := tether.grants with input as ctx(t3, prod, morning)
	{r.approval | some r in egress_to(g3, "production")} == {"a1", "a2"}
}

test_expired_approval_does_not_count if {
	t := object.union(task("incident-response", "internal"), {"approvals": [{"id": "a1", "action": "connect", "resource": "production", "expires_at": "2026-11-25T10:00:00Z"}]})
	g := tether.grants with input as ctx(t, prod, morning)
	count(egress_to(g, "production")) == 0
}

test_production_rule_outside_production_needs_nothing if {
	g := tether.grants with input as ctx(task("incident-response", "internal"), dev, morning)
	count(egress_to(g, "production")) > 0
}

test_window_open_and_its_edge if {
	g := tether.grants with input as ctx(task("customer-operations", "internal"), dev, morning)
	count(egress_to(g, "crm")) > 0

	# The window ends at 19:00, the ssh window of nothing else: valid_until is 19:00 today.
	g.valid_until == "2026-11-25T19:00:00Z"
}

test_window_closed_and_next_opening if {
	g := tether.grants with input as ctx(task("customer-operations", "internal"), dev, night)
	count(egress_to(g, "crm")) == 0

	# Next evaluation at the next 07:00.
	g.valid_until == "2026-11-29T07:00:00Z"
}

test_identity_default_task_and_audit_mode if {
	g := tether.grants with input as {"agent": agent("spiffe://tether.local/demo/auditor"), "env": dev, "time": morning}
	g.mode == "audit"
	{"path": "/usr/bin/curl"} in g.exec
}

test_audit_label if {
	a := object.union(agent("spiffe://example.org/agents/a"), {"labels": {"tether.dev/mode": "audit"}})
	g := tether.grants with input as {"agent": a, "task": task("coding", "internal"), "env": dev, "time": morning}
	g.mode == "audit"
}

test_written_rules_are_granted_as_written if {
	rules := [{"cidr": "192.0.2.0/24", "ports": [443], "protocol": "tcp"}, {"fqdn": "api.example.com", "ports": [443]}]
	profiles := {"w": {"exec": [], "high_risk": [], "unix": [], "egress": rules}}
	g := tether.grants with input as ctx(task("w", "internal"), dev, morning) with data.tether_settings.profiles as profiles
	g.egress == rules
	r := tether.grants with input as ctx(task("w", "restricted"), dev, morning) with data.tether_settings.profiles as profiles
	r.egress == []
}

test_an_unknown_network_is_passed_on_empty_so_tether_refuses_it if {
	profiles := {"n": {"exec": [], "high_risk": [], "unix": [], "network_egress": [{"network": "nosuch", "ports": [443]}]}}
	g := tether.grants with input as ctx(task("n", "internal"), dev, morning) with data.tether_settings.profiles as profiles
	g.egress == [{"cidrs": [], "ports": [443]}]
}

# Overlapping networks would let a rule to one reach the other: the kernel merges the ports of
# every covering prefix (a rule to "internal" would open "production" without its approval).
test_networks_do_not_overlap if {
	overlaps := {[a, b] |
		some a, ca in data.tether_settings.networks
		some b, cb in data.tether_settings.networks
		a < b
		some x in ca
		some y in cb
		net.cidr_intersects(x, y)
	}
	overlaps == set()
}

test_production_needs_the_approval_in_production if {
	req := {"kind": "connect", "ip": "10.100.1.1", "port": 443, "protocol": "tcp", "binary": "/usr/bin/python3"}
	not tether.allow with input as object.union(ctx(task("coding", "internal"), prod, morning), {"request": req})
	ssh := {"kind": "connect", "ip": "10.100.1.1", "port": 22, "protocol": "tcp", "binary": "/usr/bin/ssh"}
	not tether.allow with input as object.union(ctx(task("incident-response", "internal"), prod, morning), {"request": ssh})
}

test_unknown_sensitivity_counts_as_restricted if {
	g := tether.grants with input as ctx(task("coding", "Restricted"), dev, morning)
	count(egress_to(g, "git_hosting")) == 0
	count(egress_to(g, "internal")) > 0
}

test_git_hosting_closed_without_a_git_binary if {
	settings := object.remove(data.tether_settings, {"git_binary"})
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning) with data.tether_settings as settings
	count(egress_to(g, "git_hosting")) == 0
}

test_denied_tools_are_passed_on if {
	g := tether.grants with input as ctx(task("coding", "internal"), dev, morning)
	"/usr/bin/curl" in g.exec_deny
	not "/usr/bin/python3" in g.exec_deny
}
