package main

import (
	"context"
	"fmt"
	"time"

	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
)

// opaPolicy decides one connect the way an ext-authz style check in userspace would, from the
// same rules tether compiles into the kernel.
const opaPolicy = `package tether.bench

default allow := false

allow if {
	some r in data.egress
	r.protocol == input.protocol
	input.port in r.ports
	net.cidr_contains(r.cidr, input.ip)
}
`

var prepared = map[int]rego.PreparedEvalQuery{}

// opaEval returns the time of one evaluation with n rules, for the TCP loopback destination
// (the last rule: the same worst case as the nftables chain). The query is prepared once per
// rule set, as a real deployment would.
func opaEval(e *env, n int) (float64, error) {
	ctx := context.Background()
	pq, ok := prepared[n]
	if !ok {
		var rules []any
		for _, g := range e.grantsFor(n).Egress {
			var ports []any
			for _, p := range g.Ports {
				ports = append(ports, int(p.Lo))
			}
			rules = append(rules, map[string]any{"cidr": g.CIDR, "protocol": g.Protocol, "ports": ports})
		}
		store := inmem.NewFromObject(map[string]any{"egress": rules})
		var err error
		pq, err = rego.New(rego.Query("data.tether.bench.allow"), rego.Module("bench.rego", opaPolicy), rego.Store(store)).PrepareForEval(ctx)
		if err != nil {
			return 0, err
		}
		prepared[n] = pq
	}
	input := rego.EvalInput(map[string]any{"ip": e.tcpLo.Addr().String(), "port": int(e.tcpLo.Port()), "protocol": "tcp"})
	start := time.Now()
	evals := 0
	for evals < 5 || time.Since(start) < 200*time.Millisecond {
		rs, err := pq.Eval(ctx, input)
		if err != nil {
			return 0, err
		}
		if len(rs) != 1 || rs[0].Expressions[0].Value != true {
			return 0, fmt.Errorf("the policy did not allow the granted destination: %v", rs)
		}
		evals++
	}
	return float64(time.Since(start).Nanoseconds()) / float64(evals), nil
}
