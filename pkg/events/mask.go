package events

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Pointer is a JSON pointer (RFC 6901) into a policy evaluation record, such as
// /input/agent/labels/customer: the field it names is erased from the record's input before
// any sink sees it, in the spirit of OPA's data.system.log.mask.
type Pointer struct {
	text  string
	parts []string // after "input"
}

func (p Pointer) String() string { return p.text }

// ParseMask parses the masked fields. Each must point into the input (start with /input/) and
// name an object member.
func ParseMask(paths []string) ([]Pointer, error) {
	var out []Pointer
	for _, s := range paths {
		if !strings.HasPrefix(s, "/input/") || strings.HasSuffix(s, "/") {
			return nil, fmt.Errorf("mask %q: want a JSON pointer into the input, such as /input/agent/labels/customer", s)
		}
		var parts []string
		for _, seg := range strings.Split(s[len("/input/"):], "/") {
			if seg == "" {
				return nil, fmt.Errorf("mask %q: empty segment", s)
			}
			parts = append(parts, strings.NewReplacer("~1", "/", "~0", "~").Replace(seg))
		}
		out = append(out, Pointer{text: s, parts: parts})
	}
	return out, nil
}

// prepare turns an evaluation's input and result into their JSON form and erases the masked
// input fields from it. The caller's values are not changed (they are re-decoded copies).
func (p *Pump) prepare(ev Evaluation) *Evaluation {
	ev.Input = jsonValue(ev.Input)
	ev.Result = jsonValue(ev.Result)
	ev.Erased = nil
	if in, ok := ev.Input.(map[string]any); ok {
		for _, m := range p.mask {
			if erase(in, m.parts) {
				ev.Erased = append(ev.Erased, m.text)
			}
		}
	}
	return &ev
}

// jsonValue is v as encoding/json decodes its encoding: maps, slices, strings, float64, bools.
func jsonValue(v any) any {
	if v == nil {
		return nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("(not encodable: %v)", err)
	}
	var out any
	if err := json.Unmarshal(b, &out); err != nil {
		return fmt.Sprintf("(not decodable: %v)", err)
	}
	return out
}

// erase removes the member parts names from obj and reports whether it was there.
func erase(obj map[string]any, parts []string) bool {
	for len(parts) > 1 {
		next, ok := obj[parts[0]].(map[string]any)
		if !ok {
			return false
		}
		obj, parts = next, parts[1:]
	}
	if _, ok := obj[parts[0]]; !ok {
		return false
	}
	delete(obj, parts[0])
	return true
}
