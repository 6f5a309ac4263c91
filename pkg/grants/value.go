package grants

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// FromValue decodes grants from the value a policy evaluated to: JSON-shaped Go values
// (map[string]any, []any, json.Number or float64, string, bool, nil), as OPA returns them. It
// is as strict as decoding the JSON form with unknown fields disallowed (an unknown field or a
// value of the wrong type is an error naming where), and stricter in one way: field names match
// exactly, where encoding/json ignores case. It skips encoding and decoding JSON: for a thousand
// rules that round trip costs more than evaluating the policy.
func FromValue(v any) (Grants, error) {
	var g Grants
	d := &decoder{}
	d.object(v, func(k string, v any) {
		switch k {
		case "mode":
			g.Mode = d.str(v)
		case "egress":
			g.Egress = alloc[Egress](v)
			d.array(v, func(v any) { g.Egress = append(g.Egress, d.egress(v)) })
		case "exec":
			g.Exec = alloc[Exec](v)
			d.array(v, func(v any) {
				var e Exec
				d.object(v, func(k string, v any) {
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
		case "unix":
			g.Unix = alloc[Unix](v)
			d.array(v, func(v any) {
				var u Unix
				d.object(v, func(k string, v any) {
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
		case "exec_deny":
			g.ExecDeny = alloc[string](v)
			d.array(v, func(v any) { g.ExecDeny = append(g.ExecDeny, d.str(v)) })
		case "valid_until":
			if v == nil {
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
		return Grants{}, d.err
	}
	return g, nil
}

// alloc is an empty slice with room for an array value, and nil for null, as the JSON decoder
// leaves them.
func alloc[T any](v any) []T {
	if a, ok := v.([]any); ok {
		return make([]T, 0, len(a))
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

func (d *decoder) want(what string, v any) { d.failf("want %s, not %s", what, kind(v)) }

func (d *decoder) unknown() { d.failf("unknown field") }

func kind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case map[string]any:
		return "an object"
	case []any:
		return "an array"
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number, float64, int:
		return "a number"
	}
	return fmt.Sprintf("%T", v)
}

// object calls f for each field of v. null is an empty object.
func (d *decoder) object(v any, f func(k string, v any)) {
	if v == nil {
		return
	}
	m, ok := v.(map[string]any)
	if !ok {
		d.want("an object", v)
		return
	}
	for k, fv := range m {
		d.path = append(d.path, step{key: k})
		f(k, fv)
		d.path = d.path[:len(d.path)-1]
	}
}

// array calls f for each element of v. null is an empty array.
func (d *decoder) array(v any, f func(v any)) {
	if v == nil {
		return
	}
	a, ok := v.([]any)
	if !ok {
		d.want("an array", v)
		return
	}
	for i, e := range a {
		d.path = append(d.path, step{index: i})
		f(e)
		d.path = d.path[:len(d.path)-1]
	}
}

func (d *decoder) str(v any) string {
	if v == nil {
		return ""
	}
	s, ok := v.(string)
	if !ok {
		d.want("a string", v)
	}
	return s
}

func (d *decoder) bool(v any) bool {
	if v == nil {
		return false
	}
	b, ok := v.(bool)
	if !ok {
		d.want("a boolean", v)
	}
	return b
}

func (d *decoder) egress(v any) Egress {
	var e Egress
	d.object(v, func(k string, v any) {
		switch k {
		case "cidr":
			e.CIDR = d.str(v)
		case "cidrs":
			e.CIDRs = alloc[string](v)
			d.array(v, func(v any) { e.CIDRs = append(e.CIDRs, d.str(v)) })
		case "fqdn":
			e.FQDN = d.str(v)
		case "ports":
			e.Ports = alloc[PortRange](v)
			d.array(v, func(v any) { e.Ports = append(e.Ports, d.port(v)) })
		case "protocol":
			e.Protocol = d.str(v)
		case "binary":
			e.Binary = d.str(v)
		case "audit":
			e.Audit = d.bool(v)
		default:
			d.unknown()
		}
	})
	return e
}

// port is a number (443) or a string ("443", "8000-8100"), as PortRange's JSON form.
func (d *decoder) port(v any) PortRange {
	var s string
	switch n := v.(type) {
	case json.Number:
		s = n.String()
	case float64:
		s = fmt.Sprint(n)
	case string:
		s = n
	default:
		d.want("a port number or range", v)
		return PortRange{}
	}
	r, err := ParsePortRange(s)
	if err != nil {
		d.failf("%v", err)
	}
	return r
}
