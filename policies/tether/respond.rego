# tether response
#
# What tether does about an event of an agent: none, alert, freeze or kill. input.event is the
# decision record; input.counts every decision of the agent in the last minute by kind/verdict
# (this event included); input.recent its last few records.
package tether

default respond := "none"

respond := "kill" if {
	input.event.kind in {"connect4", "connect6", "sendmsg4", "sendmsg6"}
	some cidr in settings.networks.metadata
	net.cidr_contains(cidr, host(input.event.destination))
} else := "freeze" if {
	freeze_after > 0
	denied_egress >= freeze_after
} else := "alert" if {
	input.event.verdict == "deny"
	input.event.kind == "exec"
} else := "alert" if {
	# IP options or a routing header: an attempt to send packets elsewhere than the hooks allowed.
	input.event.verdict == "deny"
	input.event.reason == "detour"
} else := "alert" if {
	# A call the launcher's sandbox refused (bpf, mount, ptrace, a namespace, a packet socket...):
	# the agent reached for the machinery that confines it.
	input.event.verdict == "deny"
	input.event.kind == "syscall"
} else := "none"

# Denied egress attempts within a minute that freeze the agent (tether runs the kill path without
# halting it): tether_settings.respond.freeze_after_denied_egress, 3 when unset, 0 never.
default freeze_after := 3

freeze_after := settings.respond.freeze_after_denied_egress

# Denied egress in the last minute, this event included: from tetherd's complete counts, or
# without them (an input written by hand) from the records in input.recent.
denied_egress := sum([n |
	some kind in egress_kinds
	n := object.get(input.counts, sprintf("%s/deny", [kind]), 0)
]) if input.counts

denied_egress := count(recent_denied_egress) if not input.counts

egress_kinds := {"connect4", "connect6", "sendmsg4", "sendmsg6"}

recent_denied_egress contains e.decision_id if {
	some e in array.concat(object.get(input, "recent", []), [input.event])
	e.verdict == "deny"
	e.kind in egress_kinds
	time.parse_rfc3339_ns(e.timestamp) > now_ns - (60 * 1000000000)
}

# host is the address of "a.b.c.d:port" or "[v6]:port".
host(destination) := trim_prefix(split(destination, "]:")[0], "[") if contains(destination, "]:")

host(destination) := split(destination, ":")[0] if not contains(destination, "]:")
