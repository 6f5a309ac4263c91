# tether reference decision
#
# Whether the kernel lets one request through, defined from grants: a connect, an exec, a
# unix socket connect or a bind by an agent in the given context. Used by tests (the kernel must agree
# with it) and by `tetherctl policy eval`. In audit mode everything goes through (denials are only reported).
# fqdn rules are not resolved here, so they never match a connect; a dns request (a query the DNS
# proxy decides) is allowed when an fqdn rule names the name, or a domain above it (*.domain).
package tether

default allow := false

allow if grants.mode == "audit"

allow if {
	input.request.kind == "connect"
	some r in grants.egress
	some c in rule_cidrs(r)
	net.cidr_contains(as_cidr(c), input.request.ip)
	port_allows(r)
	protocol_allows(r)
	binary_allows(r)
}

allow if {
	input.request.kind == "exec"
	some e in grants.exec
	path_allows(e)
	digest_allows(e)
	not exec_denied(input.request.path)
}

allow if {
	input.request.kind == "dns"
	some r in grants.egress
	name_covers(object.get(r, "fqdn", ""), input.request.name)
}

# name_covers: an fqdn rule's name p covers the queried name n: the same name, or, for *.domain,
# any name below the domain (not the domain itself); without case or a trailing dot.
name_covers(p, n) if {
	p != ""
	not startswith(p, "*.")
	lower(trim_suffix(p, ".")) == lower(trim_suffix(n, "."))
}

name_covers(p, n) if {
	startswith(p, "*.")
	endswith(lower(trim_suffix(n, ".")), lower(trim_suffix(substring(p, 1, -1), ".")))
}

# A rule by sha256 alone allows any file with that content. (The kernel learns such a file from
# the first exec it denies, so it allows from the second one on.)
path_allows(e) if glob.match(e.path, ["/"], input.request.path)

path_allows(e) if not e.path

# A rule with a sha256 allows the file only with that content.
digest_allows(e) if not e.sha256

digest_allows(e) if e.sha256 == input.request.sha256

# Binding or listening: on loopback always, to port 0 (an ephemeral port, as clients take; a
# listener there gets no connection from elsewhere) always, elsewhere on the ports of a listen
# rule.
allow if {
	input.request.kind == "bind"
	loopback(input.request.ip)
}

allow if {
	input.request.kind == "bind"
	object.get(input.request, "port", 0) == 0
}

allow if {
	input.request.kind == "bind"
	some l in object.get(grants, "listen", [])
	port_allows(l)
	protocol_allows(l)
}

loopback(ip) if net.cidr_contains("127.0.0.0/8", ip)

loopback(ip) if ip == "::1"

# tether matches exec_deny by file identity; here, by name.
exec_denied(path) if {
	some d in object.get(grants, "exec_deny", [])
	glob.match(d, ["/"], path)
}

# A unix socket: the exact path (or @abstract name) the agent passes, or any path below a
# directory granted as "/dir/*".
allow if {
	input.request.kind == "unix"
	some u in grants.unix
	unix_matches(u.path, input.request.path)
}

# A pathname with a ".." component matches nothing: it could climb out of a granted directory.
unix_matches(granted, path) if {
	granted == path
	not dotdot(path)
}

unix_matches(granted, path) if {
	endswith(granted, "/*")
	startswith(path, trim_suffix(granted, "*"))
	not dotdot(path)
}

dotdot(path) if {
	not startswith(path, "@")
	".." in split(path, "/")
}

# A rule names one prefix (cidr) or several (cidrs); fqdn rules name none here.
rule_cidrs(r) := array.concat(object.get(r, "cidrs", []), [c | c := r.cidr])

# A prefix may be a single address.
as_cidr(c) := c if contains(c, "/")

as_cidr(c) := concat("", [c, "/128"]) if {
	not contains(c, "/")
	contains(c, ":")
}

as_cidr(c) := concat("", [c, "/32"]) if {
	not contains(c, "/")
	not contains(c, ":")
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
