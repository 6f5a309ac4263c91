package main

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/tether-sh/tether/pkg/identity"
)

// What a flag expects, checked before anything reaches tetherd: a kind, or one of a set of
// words (the annotation's values).
const (
	expectAnnotation = "tetherctl/expect"
	kindSPIFFEID     = "<spiffe-id>"
	kindDuration     = "<duration>"
)

// expect says what the flag name of cmd takes: kindSPIFFEID, kindDuration, or one of values.
func expect(cmd *cobra.Command, name string, values ...string) {
	if err := cmd.Flags().SetAnnotation(name, expectAnnotation, values); err != nil {
		panic(err) // a flag that does not exist: a mistake in this file's callers
	}
}

// outputs are the formats of -o.
var outputs = []string{"text", "json", "yaml"}

// checkFlags checks the flags of cmd that have a value (given, or by default) against what they
// expect, and -o: every error at once, before any call to tetherd.
func checkFlags(cmd *cobra.Command) error {
	var errs []error
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		want := f.Annotations[expectAnnotation]
		if f.Name == "output" && f.Shorthand == "o" {
			want = outputs
		}
		if v := f.Value.String(); len(want) > 0 && v != "" {
			if err := checkValue(f.Name, v, want); err != nil {
				errs = append(errs, err)
			}
		}
	})
	return errors.Join(errs...)
}

func checkValue(name, v string, want []string) error {
	switch want[0] {
	case kindSPIFFEID:
		if _, err := spiffeID(v); err != nil {
			return fmt.Errorf("--%s %q is not a SPIFFE ID (%v)", name, v, err)
		}
	case kindDuration:
		if d, err := time.ParseDuration(v); err != nil || d <= 0 {
			return fmt.Errorf("--%s %q: want a positive duration, such as 90s, 30m or 8h", name, v)
		}
	default:
		if !slices.Contains(want, v) {
			return fmt.Errorf("--%s %q: want %s", name, v, strings.Join(want, ", "))
		}
	}
	return nil
}

// spiffeID parses s as a SPIFFE ID (pkg/identity: go-spiffe's spiffeid), with go-spiffe's reason
// when it is not one.
func spiffeID(s string) (string, error) {
	id, err := identity.Parse(s)
	if err != nil {
		if inner := errors.Unwrap(err); inner != nil {
			return "", inner
		}
		return "", err
	}
	return id, nil
}

// checkSelector checks an argument that names agents: a slot number or a SPIFFE ID.
func checkSelector(s string) error {
	if _, err := strconv.ParseUint(s, 10, 32); err == nil {
		return nil
	}
	if _, err := spiffeID(s); err != nil {
		return fmt.Errorf("%q: name an agent by slot number or SPIFFE ID (%v)", s, err)
	}
	return nil
}

// checkSPIFFEID checks an argument that must be a SPIFFE ID.
func checkSPIFFEID(s string) error {
	if _, err := spiffeID(s); err != nil {
		return fmt.Errorf("%q is not a SPIFFE ID (%v)", s, err)
	}
	return nil
}

// completeAgents completes an argument that names agents: the slots and SPIFFE IDs of the agents
// tetherd has (nothing when it does not answer).
func completeAgents(g *globals) cobra.CompletionFunc {
	return func(_ *cobra.Command, _ []string, _ string) ([]cobra.Completion, cobra.ShellCompDirective) {
		list, err := g.client().Agents()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var out []cobra.Completion
		seen := map[string]bool{}
		for _, a := range list {
			out = append(out, cobra.CompletionWithDesc(strconv.FormatUint(uint64(a.Slot), 10), a.SpiffeID))
			if !seen[a.SpiffeID] {
				seen[a.SpiffeID] = true
				out = append(out, a.SpiffeID)
			}
		}
		return out, cobra.ShellCompDirectiveNoFileComp
	}
}

// agentArgs are the commands whose first argument names agents (a slot or a SPIFFE ID).
var agentArgs = map[string]bool{
	"mode": true, "set-killed": true, "unregister": true, "kill": true, "resume": true, "readmit": true,
	"task start": true, "task renew": true, "task end": true, "task approve": true, "task handoff": true,
	"credential show": true, "credential heartbeat": true,
}

// slotArgs are the commands of agentArgs whose argument is a slot only.
var slotArgs = map[string]bool{"resume": true, "task handoff": true, "credential show": true, "credential heartbeat": true}

// secondArgs are the words a command's second argument takes.
var secondArgs = map[string][]string{"mode": {"enforce", "audit", "default"}, "set-killed": {"true", "false"}}

// addCompletion completes, in every command below root, agents where an argument names them,
// the words of an enumerated flag or argument, and agents' SPIFFE IDs for a SPIFFE ID flag.
func addCompletion(root *cobra.Command, g *globals) {
	var walk func(*cobra.Command)
	walk = func(cmd *cobra.Command) {
		for _, c := range cmd.Commands() {
			walk(c)
		}
		name := strings.TrimPrefix(cmd.CommandPath(), root.Name()+" ")
		agentsOf := completeAgents(g)
		if agentArgs[name] && cmd.ValidArgsFunction == nil {
			cmd.ValidArgsFunction = func(c *cobra.Command, args []string, to string) ([]cobra.Completion, cobra.ShellCompDirective) {
				if len(args) == 0 {
					all, d := agentsOf(c, args, to)
					return slices.DeleteFunc(all, func(a cobra.Completion) bool {
						id := strings.HasPrefix(a, "spiffe://")
						return (slotArgs[name] && id) || (name == "readmit" && !id)
					}), d
				}
				if len(args) == 1 && secondArgs[name] != nil {
					return secondArgs[name], cobra.ShellCompDirectiveNoFileComp
				}
				return nil, cobra.ShellCompDirectiveNoFileComp
			}
		}
		cmd.Flags().VisitAll(func(f *pflag.Flag) {
			want := f.Annotations[expectAnnotation]
			if f.Name == "output" && f.Shorthand == "o" {
				want = outputs
			}
			var fn cobra.CompletionFunc
			switch {
			case len(want) == 0 || want[0] == kindDuration:
				return
			case want[0] == kindSPIFFEID:
				fn = func(c *cobra.Command, args []string, to string) ([]cobra.Completion, cobra.ShellCompDirective) {
					all, d := agentsOf(c, args, to)
					var ids []cobra.Completion
					for _, a := range all {
						if strings.HasPrefix(a, "spiffe://") {
							ids = append(ids, a)
						}
					}
					return ids, d
				}
			default:
				words := want
				fn = cobra.FixedCompletions(words, cobra.ShellCompDirectiveNoFileComp)
			}
			_ = cmd.RegisterFlagCompletionFunc(f.Name, fn)
		})
	}
	walk(root)
}

// addExamples sets the Example of every command below root from examples.
func addExamples(root *cobra.Command) {
	var walk func(*cobra.Command)
	walk = func(cmd *cobra.Command) {
		for _, c := range cmd.Commands() {
			walk(c)
		}
		if ex, ok := examples[strings.TrimPrefix(cmd.CommandPath(), root.Name()+" ")]; ok && cmd.Example == "" {
			cmd.Example = ex
		}
	}
	walk(root)
}
