# METADATA
# title: tether grants
# description: |
#   What an agent may do now, decided from its identity, its task, its environment and the time.
#   tether compiles the result into the kernel; anything not granted is denied. See
#   policies/README.md for the input and the result.
package tether

settings := data.tether_settings

# The identity's own settings (a task type used when it has no task, a mode), if any.
identity := settings.identities[input.agent.spiffe_id]

default task_type := ""

task_type := input.task.type

task_type := identity.task_type if not input.task

default profile := {"exec": [], "egress": [], "unix": [], "high_risk": []}

profile := settings.profiles[task_type]

default mode := "enforce"

mode := "audit" if identity.mode == "audit"

mode := "audit" if input.agent.labels["tether.dev/mode"] == "audit"

now_ns := time.parse_rfc3339_ns(input.time.now)

# --- exec -----------------------------------------------------------------------------------

# High-risk tools (shells, network tools, interpreters, package managers, cloud CLIs) are denied
# unless the task type grants their category, even if a profile lists one by name.
granted_categories := {c | some c in object.get(profile, "high_risk", [])}

high_risk_denied contains path if {
	some category, paths in settings.tools
	not category in granted_categories
	some path in paths
}

# A profile entry is a path or a glob; one that names or covers a denied high-risk tool is not
# granted at all (a glob like /usr/bin/* would otherwise let every tool through).
exec_paths contains path if {
	some path in object.get(profile, "exec", [])
	is_string(path)
	not covers_denied(path)
}

# An entry may also pin the content: {"path": ..., "sha256": ...}, or grant any file with that
# content: {"sha256": ...}.
exec_pinned contains object.filter(e, ["path", "sha256"]) if {
	some e in object.get(profile, "exec", [])
	is_object(e)
	not covers_denied(object.get(e, "path", ""))
}

covers_denied(pattern) if {
	some denied in high_risk_denied
	glob.match(pattern, ["/"], denied)
}

exec := array.concat([{"path": p} | some p in sort(exec_paths)], sort(exec_pinned))

# The denied tools also go to tether, which refuses any exec rule that resolves to one of them
# under another name (a symlink such as python3 -> python3.11, a hard link, a glob).
exec_deny := sort(high_risk_denied)

# --- egress ---------------------------------------------------------------------------------

# A profile has two kinds of egress rules. `egress` rules are in the grant shape (cidr, cidrs or
# fqdn; ports, protocol, binary, audit) and are granted as written. `network_egress` rules name
# a network of settings.networks and may carry conditions (production, window); each one that
# holds becomes one grant with the network's cidrs. Written rules are passed through, not
# rebuilt one by one, so even a profile of thousands evaluates in about a millisecond.

# A task touching restricted data reaches internal networks only: no written rules (they may
# go anywhere, fqdn rules included) and only network rules to internal networks. A sensitivity
# the policy does not know counts as restricted: a typo must not open the internet.
known_sensitivities := {"public", "internal", "confidential"}

restricted if input.task.sensitivity == "restricted"

restricted if {
	s := object.get(input.task, "sensitivity", "")
	s != ""
	not s in known_sensitivities
}

default written_egress := []

written_egress := object.get(profile, "egress", []) if not restricted

sensitivity_allows(r) if not restricted

sensitivity_allows(r) if r.network in settings.internal_networks

# In production, a rule marked production needs an approved step-up for its network. holds(r)
# says on what a rule holds: by itself ({}), or in production by each live approval of its
# network ({"approval": id}): tether has the kernel count that approval's uses and enforce its
# expiry on the rule.
holds(r) := [{}] if not r.production

holds(r) := [{}] if {
	r.production
	input.env.environment != "production"
}

holds(r) := [{"approval": a.id} |
	some a in input.task.approvals
	a.action == "connect"
	a.resource == r.network
	time.parse_rfc3339_ns(a.expires_at) > now_ns
] if {
	r.production
	input.env.environment == "production"
}

approved(action, resource) if {
	some a in input.task.approvals
	a.action == action
	a.resource == resource
	time.parse_rfc3339_ns(a.expires_at) > now_ns
}

# A rule with a window holds only inside it (weekday and hour in the configured time zone).
window_allows(r) if not r.window

window_allows(r) if in_window(r.window)

in_window(w) if {
	input.time.weekday in w.days
	input.time.hour >= w.start_hour
	input.time.hour < w.end_hour
}

# Tool chain: only git may reach the git hosting service; without a git_binary setting, nothing
# may.
default chain(_) := {}

chain(r) := {"binary": settings.git_binary} if r.network == "git_hosting"

chain_holds(r) if r.network != "git_hosting"

chain_holds(r) if settings.git_binary

network_rules := object.get(profile, "network_egress", [])

# Where a network rule goes: a service of settings.services is its DNS names, one fqdn rule each
# (exact, or *.domain: every name below it, which needs tether's DNS proxy; with the proxy, what
# the agent was answered is granted, else what tether resolves); a network of settings.networks
# is its cidrs. A name in neither gets no cidrs: tether refuses the rule, and says so.
services := object.get(settings, "services", {})

destinations(r) := [{"fqdn": name} | some name in services[r.network]] if services[r.network]

destinations(r) := [{"cidrs": object.get(settings.networks, r.network, [])}] if not services[r.network]

network_egress contains rule if {
	some r in network_rules
	chain_holds(r)
	sensitivity_allows(r)
	window_allows(r)
	some held in holds(r)
	some dest in destinations(r)
	rule := object.union(object.union(object.union(object.remove(r, {"network", "production", "window"}), dest), chain(r)), held)
}

egress := array.concat(written_egress, [r | some r in network_egress])

unix := [{"path": p} | some p in object.get(profile, "unix", [])]

# Ports the task type may listen on beyond loopback (the shipped profiles name none).
default listen_field := {}

listen_field := {"listen": profile.listen} if count(object.get(profile, "listen", [])) > 0

# --- when the grants change by themselves ---------------------------------------------------

# The next edge of every windowed rule: tether evaluates again then, not on a timer.
seconds_into_hour := (clock[1] * 60) + clock[2] if clock := time.clock([now_ns, input.time.timezone])

window_edge(w) := now_ns + ((((w.end_hour - input.time.hour) * 3600) - seconds_into_hour) * 1000000000) if in_window(w)

window_edge(w) := now_ns + ((((w.start_hour - input.time.hour) * 3600) - seconds_into_hour) * 1000000000) if {
	not in_window(w)
	input.time.hour < w.start_hour
}

window_edge(w) := now_ns + (((((24 - input.time.hour) + w.start_hour) * 3600) - seconds_into_hour) * 1000000000) if {
	not in_window(w)
	input.time.hour >= w.start_hour
}

edges contains window_edge(r.window) if {
	some r in network_rules
	r.window
}

default valid_until_field := {}

valid_until_field := {"valid_until": time.format([min(edges), "UTC", "2006-01-02T15:04:05Z07:00"])} if count(edges) > 0

# --- confinement ------------------------------------------------------------------------------

# How `tetherctl run` confines an agent it launches: strict, default, or off (which an admin's
# launch rule must allow). A task type that runs untrusted input gets strict.
sandbox := object.get(profile, "sandbox", "default")

# However often a task is renewed (launcher heartbeats, or the agent itself on the agent socket),
# it does not live past this after it started.
max_lifetime := object.get(profile, "max_lifetime", "8h")

# --- the result -----------------------------------------------------------------------------

grants := object.union(
	object.union(
		{"mode": mode, "egress": egress, "exec": exec, "exec_deny": exec_deny, "unix": unix, "sandbox": sandbox, "max_lifetime": max_lifetime},
		valid_until_field,
	),
	listen_field,
)
