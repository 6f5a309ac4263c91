# tether reference decision
#
# Whether the kernel lets one request through, defined from grants: a connect or an exec by
# an agent in the given context. Used by tests (the kernel must agree with it) and by
# `tetherctl policy eval`. In audit mode everything goes through (denials are only reported).
# fqdn rules are not resolved here, so they never match.
package tether

default allow := false

allow if grants.mode == "audit"

allow if {
	input.request.kind == "connect"
	some r in grants.egress
	r.cidr
	net.cidr_contains(r.cidr, input.request.ip)
	port_allows(r)
	protocol_allows(r)
	binary_allows(r)
}

allow if {
	input.request.kind == "exec"
	some e in grants.exec
	glob.match(e.path, ["/"], input.request.path)
}

port_allows(r) if not r.ports

port_allows(r) if {
	some p in r.ports
	is_number(p)
	p == input.request.port
}

port_allows(r) if {
	some p in r.ports
	is_string(p)
	bounds := split(p, "-")
	to_number(bounds[0]) <= input.request.port
	input.request.port <= to_number(bounds[count(bounds) - 1])
}

protocol_allows(r) if object.get(r, "protocol", "any") in {"any", ""}

protocol_allows(r) if r.protocol == input.request.protocol

binary_allows(r) if not r.binary

binary_allows(r) if r.binary == input.request.binary
