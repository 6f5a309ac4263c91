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
	d := &decoder{}
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "mode":
			g.Mode = d.str(v)
		case "egress":
			g.Egress = alloc[grants.Egress](v)
			d.array(v, func(v ast.Value) { g.Egress = append(g.Egress, d.egress(v)) })
		case "exec":
			g.Exec = alloc[grants.Exec](v)
			d.array(v, func(v ast.Value) {
				var e grants.Exec
				d.object(v, func(k string, v ast.Value) {
					switch k {
					case "path":
						e.Path = d.str(v)
					case "audit":
						e.Audit = d.bool(v)
					default:
						d.unknown()
					}
				})
				g.Exec = append(g.Exec, e)
			})
		case "exec_deny":
			g.ExecDeny = alloc[string](v)
			d.array(v, func(v ast.Value) { g.ExecDeny = append(g.ExecDeny, d.str(v)) })
		case "unix":
			g.Unix = alloc[grants.Unix](v)
			d.array(v, func(v ast.Value) {
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
				g.Unix = append(g.Unix, u)
			})
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

// decoder keeps the first error and where the decoding is (rendered only for an error).
type decoder struct {
	err  error
	path []step
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
	o.Foreach(func(k, fv *ast.Term) {
		key, ok := k.Value.(ast.String)
		if !ok {
			d.failf("a key that is not a string: %v", k)
			return
		}
		d.path = append(d.path, step{key: string(key)})
		f(string(key), fv.Value)
		d.path = d.path[:len(d.path)-1]
	})
}

// array calls f for each element of v (an array, or a set in order). null is an empty array.
func (d *decoder) array(v ast.Value, f func(v ast.Value)) {
	i := 0
	each := func(e *ast.Term) {
		d.path = append(d.path, step{index: i})
		f(e.Value)
		d.path = d.path[:len(d.path)-1]
		i++
	}
	switch a := v.(type) {
	case *ast.Array:
		a.Foreach(each)
	case ast.Set:
		a.Sorted().Foreach(each)
	default:
		if !isNull(v) {
			d.want("an array", v)
		}
	}
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
	var e grants.Egress
	d.object(v, func(k string, v ast.Value) {
		switch k {
		case "cidr":
			e.CIDR = d.str(v)
		case "cidrs":
			e.CIDRs = alloc[string](v)
			d.array(v, func(v ast.Value) { e.CIDRs = append(e.CIDRs, d.str(v)) })
		case "fqdn":
			e.FQDN = d.str(v)
		case "ports":
			e.Ports = alloc[grants.PortRange](v)
			d.array(v, func(v ast.Value) { e.Ports = append(e.Ports, d.port(v)) })
		case "protocol":
			e.Protocol = d.str(v)
		case "binary":
			e.Binary = d.str(v)
		case "audit":
			e.Audit = d.bool(v)
		case "approval":
			e.Approval = d.str(v)
		default:
			d.unknown()
		}
	})
	return e
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
