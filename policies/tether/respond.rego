# tether response
#
# What tether does about an event of an agent: none, alert, freeze or kill. input.event is the
# decision record; input.recent the agent's decisions of the last minute.
package tether

default respond := "none"

respond := "kill" if {
	input.event.kind in {"connect4", "connect6", "sendmsg4", "sendmsg6"}
	some cidr in settings.networks.metadata
	net.cidr_contains(cidr, host(input.event.destination))
} else := "freeze" if {
	freeze_after > 0
	count(recent_denied_egress) >= freeze_after
} else := "alert" if {
	input.event.verdict == "deny"
	input.event.kind == "exec"
} else := "none"

# Denied egress attempts within a minute that freeze the agent (tether runs the kill path without
# halting it): tether_settings.respond.freeze_after_denied_egress, 3 when unset, 0 never.
default freeze_after := 3

freeze_after := settings.respond.freeze_after_denied_egress

# Denied egress to destinations no approval covers, in the last minute, this event included.
recent_denied_egress contains e.decision_id if {
	some e in array.concat(object.get(input, "recent", []), [input.event])
	e.verdict == "deny"
	e.kind in {"connect4", "connect6", "sendmsg4", "sendmsg6"}
	time.parse_rfc3339_ns(e.timestamp) > now_ns - (60 * 1000000000)
}

# host is the address of "a.b.c.d:port" or "[v6]:port".
host(destination) := trim_prefix(split(destination, "]:")[0], "[") if contains(destination, "]:")

host(destination) := split(destination, ":")[0] if not contains(destination, "]:")
