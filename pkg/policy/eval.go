package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"github.com/tether-sh/tether/pkg/compile"
)

// EvalResult is one decision, as `tetherctl policy eval` prints it.
type EvalResult struct {
	Query    string `json:"query"`
	Revision string `json:"revision"`
	Result   any    `json:"result"`
	// For grants: what the kernel would get.
	Compiled *Compiled `json:"compiled,omitempty"`
}

// Compiled summarises a compiled rule set.
type Compiled struct {
	Mode     string   `json:"mode"`
	Egress   int      `json:"egress_entries"`
	Exec     int      `json:"exec_entries"`
	Unix     int      `json:"unix_entries"`
	Refused  []string `json:"refused,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

// DecodeInput reads an input document; unknown fields are errors, like the schema says.
func DecodeInput(b []byte) (Input, error) {
	var in Input
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&in); err != nil {
		return in, fmt.Errorf("input: %w", err)
	}
	if in.Agent.SpiffeID == "" || in.Time.Now == "" {
		return in, fmt.Errorf("input: agent.spiffe_id and time are required (see policies/input.schema.json)")
	}
	return in, nil
}

// Eval decides query (grants, allow, stepup or respond) for input with rev; grants are compiled
// with opts too.
func Eval(ctx context.Context, rev *Revision, query string, input []byte, opts compile.Options) (*EvalResult, error) {
	in, err := DecodeInput(input)
	if err != nil {
		return nil, err
	}
	res := &EvalResult{Query: query, Revision: rev.ID}
	switch query {
	case "grants":
		g, err := rev.Grants(ctx, in)
		if err != nil {
			return nil, err
		}
		res.Result = g
		c := compile.Compile(ctx, g, opts)
		res.Compiled = &Compiled{Mode: c.RuleSet.Mode.String(), Egress: len(c.RuleSet.Egress), Exec: len(c.RuleSet.Exec),
			Unix: len(c.RuleSet.Unix), Warnings: c.Warnings}
		for _, f := range c.Refused {
			res.Compiled.Refused = append(res.Compiled.Refused, f.Error())
		}
	case "allow":
		res.Result, err = rev.Allow(ctx, in)
	case "stepup":
		res.Result, err = rev.Stepup(ctx, in)
	case "respond":
		res.Result, err = rev.Respond(ctx, in)
	default:
		return nil, fmt.Errorf("query %q: want grants, allow, stepup or respond", query)
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}
