package policy

import (
	"fmt"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/tether-sh/tether/pkg/grants"
)

// decodeGrants reads grants straight from the value data.tether.grants evaluated to, as strictly
// as decoding its JSON form with unknown fields disallowed (an unknown field or a value of the
// wrong type is an error naming where), and stricter in one way: field names match exactly,
// where encoding/json ignores case. A set is read as an array. It skips OPA's conversion to Go
// values and any JSON: for a thousand rules those cost more than evaluating the policy.
func decodeGrants(v ast.Value) (grants.Grants, error) {
	var g grants.Grants
	d := newDecoder()
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "mode":
			g.Mode = d.str(v)
		case "egress":
			g.Egress = alloc[grants.Egress](v)
			d.ports = make([]grants.PortRange, 0, cap(g.Egress))
			d.array(v, func(v ast.Value) { g.Egress = append(g.Egress, d.egress(v)) })
		case "exec":
			g.Exec = alloc[grants.Exec](v)
			d.array(v, func(v ast.Value) { g.Exec = append(g.Exec, d.exec(v)) })
		case "exec_deny":
			g.ExecDeny = alloc[string](v)
			d.array(v, func(v ast.Value) { g.ExecDeny = append(g.ExecDeny, d.str(v)) })
		case "unix":
			g.Unix = alloc[grants.Unix](v)
			d.array(v, func(v ast.Value) { g.Unix = append(g.Unix, d.unix(v)) })
		case "listen":
			g.Listen = alloc[grants.Listen](v)
			d.array(v, func(v ast.Value) { g.Listen = append(g.Listen, d.listen(v)) })
		case "sandbox":
			g.Sandbox = d.str(v)
		case "max_lifetime":
			g.MaxLifetime = d.str(v)
		case "valid_until":
			if isNull(v) {
				return
			}
			s := d.str(v)
			t, err := time.Parse(time.RFC3339, s)
			if err != nil {
				d.failf("%q is not an RFC 3339 time", s)
			}
			g.ValidUntil = &t
		default:
			d.unknown()
		}
	})
	if d.err != nil {
		return grants.Grants{}, d.err
	}
	return g, nil
}

// exec decodes an exec grant.
func (d *decoder) exec(v ast.Value) grants.Exec {
	var e grants.Exec
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "path":
			e.Path = d.str(v)
		case "sha256":
			e.SHA256 = d.str(v)
		case "audit":
			e.Audit = d.bool(v)
		default:
			d.unknown()
		}
	})
	return e
}

// unix decodes a unix socket grant.
func (d *decoder) unix(v ast.Value) grants.Unix {
	var u grants.Unix
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "path":
			u.Path = d.str(v)
		case "audit":
			u.Audit = d.bool(v)
		default:
			d.unknown()
		}
	})
	return u
}

// listen decodes a listen grant.
func (d *decoder) listen(v ast.Value) grants.Listen {
	var l grants.Listen
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "ports":
			l.Ports = alloc[grants.PortRange](v)
			d.array(v, func(v ast.Value) { l.Ports = append(l.Ports, d.port(v)) })
		case "protocol":
			l.Protocol = d.str(v)
		case "audit":
			l.Audit = d.bool(v)
		default:
			d.unknown()
		}
	})
	return l
}

func isNull(v ast.Value) bool {
	_, null := v.(ast.Null)
	return v == nil || null
}

// alloc is an empty slice with room for an array value, and nil for null, as the JSON decoder
// leaves them.
func alloc[T any](v ast.Value) []T {
	switch a := v.(type) {
	case *ast.Array:
		return make([]T, 0, a.Len())
	case ast.Set:
		return make([]T, 0, a.Len())
	}
	return nil
}

// decoder keeps the first error and where the decoding is (rendered only for an error). The
// callbacks that OPA's iteration calls are made once per decoder, with the object or array being
// read on a stack, and an egress rule is read into the decoder: closures made per value were
// most of the cost of reading a thousand rules.
type decoder struct {
	err  error
	path []step
	// fields and elems are the callbacks of the objects and arrays being read, innermost last;
	// index counts the elements read of each array.
	fields  []func(k string, v ast.Value)
	elems   []func(v ast.Value)
	index   []int
	onField func(k, v *ast.Term)
	onElem  func(e *ast.Term)
	// e is the egress rule being read; ports holds the port ranges of all of them.
	e           grants.Egress
	ports       []grants.PortRange
	egressField func(k string, v ast.Value)
	portElem    func(v ast.Value)
}

func newDecoder() *decoder {
	d := &decoder{}
	d.onField = func(k, fv *ast.Term) {
		key, ok := k.Value.(ast.String)
		if !ok {
			d.failf("a key that is not a string: %v", k)
			return
		}
		d.path = append(d.path, step{key: string(key)})
		d.fields[len(d.fields)-1](string(key), fv.Value)
		d.path = d.path[:len(d.path)-1]
	}
	d.onElem = func(e *ast.Term) {
		top := len(d.index) - 1
		d.path = append(d.path, step{index: d.index[top]})
		d.elems[top](e.Value)
		d.path = d.path[:len(d.path)-1]
		d.index[top]++
	}
	d.egressField = d.egressFieldOf
	d.portElem = func(v ast.Value) { d.ports = append(d.ports, d.port(v)) }
	return d
}

type step struct {
	key   string // a field, or "" for an element
	index int
}

func (d *decoder) where() string {
	var b strings.Builder
	b.WriteString("grants")
	for _, s := range d.path {
		if s.key != "" {
			b.WriteString("." + s.key)
		} else {
			fmt.Fprintf(&b, "[%d]", s.index)
		}
	}
	return b.String()
}

func (d *decoder) failf(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%s: %s", d.where(), fmt.Sprintf(format, args...))
	}
}

func (d *decoder) want(what string, v ast.Value) { d.failf("want %s, not %s", what, kind(v)) }

func (d *decoder) unknown() { d.failf("unknown field") }

func kind(v ast.Value) string {
	switch v.(type) {
	case nil, ast.Null:
		return "null"
	case ast.Object:
		return "an object"
	case *ast.Array:
		return "an array"
	case ast.Set:
		return "a set"
	case ast.String:
		return "a string"
	case ast.Boolean:
		return "a boolean"
	case ast.Number:
		return "a number"
	}
	return fmt.Sprintf("%T", v)
}

// object calls f for each field of v, in key order. null is an empty object.
func (d *decoder) object(v ast.Value, f func(k string, v ast.Value)) {
	if isNull(v) {
		return
	}
	o, ok := v.(ast.Object)
	if !ok {
		d.want("an object", v)
		return
	}
	d.fields = append(d.fields, f)
	o.Foreach(d.onField)
	d.fields = d.fields[:len(d.fields)-1]
}

// array calls f for each element of v (an array, or a set in order). null is an empty array.
func (d *decoder) array(v ast.Value, f func(v ast.Value)) {
	var each func(func(*ast.Term))
	switch a := v.(type) {
	case *ast.Array:
		each = a.Foreach
	case ast.Set:
		each = a.Sorted().Foreach
	default:
		if !isNull(v) {
			d.want("an array", v)
		}
		return
	}
	d.elems, d.index = append(d.elems, f), append(d.index, 0)
	each(d.onElem)
	d.elems, d.index = d.elems[:len(d.elems)-1], d.index[:len(d.index)-1]
}

func (d *decoder) str(v ast.Value) string {
	if isNull(v) {
		return ""
	}
	s, ok := v.(ast.String)
	if !ok {
		d.want("a string", v)
	}
	return string(s)
}

func (d *decoder) bool(v ast.Value) bool {
	if isNull(v) {
		return false
	}
	b, ok := v.(ast.Boolean)
	if !ok {
		d.want("a boolean", v)
	}
	return bool(b)
}

func (d *decoder) egress(v ast.Value) grants.Egress {
	d.e = grants.Egress{}
	d.object(v, d.egressField)
	return d.e
}

func (d *decoder) egressFieldOf(k string, v ast.Value) {
	e := &d.e
	switch k {
	case "cidr":
		e.CIDR = d.str(v)
	case "cidrs":
		e.CIDRs = alloc[string](v)
		d.array(v, func(v ast.Value) { e.CIDRs = append(e.CIDRs, d.str(v)) })
	case "fqdn":
		e.FQDN = d.str(v)
	case "ports":
		if isNull(v) {
			e.Ports = nil
			return
		}
		start := len(d.ports)
		d.array(v, d.portElem)
		e.Ports = d.ports[start:len(d.ports):len(d.ports)]
	case "protocol":
		e.Protocol = d.str(v)
	case "binary":
		e.Binary = d.str(v)
	case "audit":
		e.Audit = d.bool(v)
	case "approval":
		e.Approval = d.str(v)
	case "max_duration":
		e.MaxDuration = d.str(v)
	default:
		d.unknown()
	}
}

// port is a number (443) or a string ("443", "8000-8100"), as PortRange's JSON form.
func (d *decoder) port(v ast.Value) grants.PortRange {
	var s string
	switch n := v.(type) {
	case ast.Number:
		s = string(n)
	case ast.String:
		s = string(n)
	default:
		d.want("a port number or range", v)
		return grants.PortRange{}
	}
	r, err := grants.ParsePortRange(s)
	if err != nil {
		d.failf("%v", err)
	}
	return r
}
