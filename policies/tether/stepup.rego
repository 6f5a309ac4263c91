# tether step-up
#
# Whether an agent may have an extra right it asks for: allowed outright, allowed after a
# human approves it (for ttl), or refused with the reason.
package tether

default stepup := {"allowed": false, "needs_approval": false, "reason": "no rule allows this request"}

stepup := {"allowed": false, "needs_approval": false, "reason": "the task handles restricted data"} if {
	restricted
	input.request.action in {"connect", "read-secret"}
	not input.request.resource in settings.internal_networks
}

else := {"allowed": true, "needs_approval": true, "ttl": "15m", "reason": "production access needs an approval"} if {
	input.request.action == "connect"
	some r in network_rules
	r.production
	r.network == input.request.resource
}

else := {"allowed": true, "needs_approval": true, "ttl": "5m", "reason": "reading a secret needs an approval"} if {
	input.request.action == "read-secret"
	task_type in {"incident-response", "customer-operations"}
}

else := {"allowed": true, "needs_approval": false, "ttl": "1h", "reason": "within the task's profile"} if {
	input.request.action == "connect"
	some r in network_rules
	not r.production
	r.network == input.request.resource
}

# A handoff: the task type's profile names the agents (SPIFFE ID globs) its tasks may be handed
# to ("handoff_to"). The receiver's grants are then at most the sender's, whatever this says.
else := {"allowed": true, "needs_approval": false, "reason": "the task type may hand work to this agent"} if {
	input.request.action == "handoff"
	some pattern in object.get(profile, "handoff_to", [])
	glob.match(pattern, ["/"], input.request.resource)
}
