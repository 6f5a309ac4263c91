package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/policies"
)

func newPolicy(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Check, evaluate and reload tether's policy"}

	check := &cobra.Command{
		Use:   "check DIR",
		Short: "Check a policy directory the way tetherd would before putting it in force, and run its tests",
		Long: `check loads DIR (Rego and data), type-checks it against the input schema, compiles it,
evaluates every decision for the standard probe inputs (and each --input file), and runs its
*_test.rego files. It prints every error with file:line and exits 1 if there is one.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return policyCheck(cmd, args[0], g.inputs)
		},
	}
	check.Flags().StringArrayVar(&g.inputs, "input", nil, "also check these input files (JSON)")

	var dir, query, inputFile string
	eval := &cobra.Command{
		Use:   "eval --input FILE [--query grants|allow|stepup|respond] [--policy DIR]",
		Short: "Evaluate one decision: with the policy tetherd has in force, or with DIR",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			input, err := os.ReadFile(inputFile)
			if err != nil {
				return err
			}
			if dir == "" {
				out, err := g.client().EvalPolicy(query, input)
				if err != nil {
					return err
				}
				var v any
				json.Unmarshal(out, &v)
				return printJSON(cmd.OutOrStdout(), v)
			}
			rev, err := compileDir(dir)
			if err != nil {
				return err
			}
			res, err := policy.Eval(context.Background(), rev, query, input, compile.Options{Files: compile.OS{}, Resolver: systemDNS()})
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), res)
		},
	}
	eval.Flags().StringVar(&dir, "policy", "", "evaluate with this policy directory instead of tetherd's")
	eval.Flags().StringVar(&query, "query", "grants", "grants, allow, stepup or respond")
	eval.Flags().StringVar(&inputFile, "input", "", "the input document (JSON, see policies/input.schema.json)")
	eval.MarkFlagRequired("input")
	expect(eval, "query", "grants", "allow", "stepup", "respond")

	reload := &cobra.Command{
		Use:   "reload",
		Short: "Have tetherd read its policy directory again",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := g.client().ReloadPolicy()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "policy revision %s in force (from %s)\n", st.Revision, st.Source)
			return nil
		},
	}
	cmd.AddCommand(check, eval, reload)
	return cmd
}

func systemDNS() compile.Resolver {
	if s, err := compile.SystemDNS(); err == nil {
		return compile.NewDNS(s)
	}
	return nil
}

func schema() []byte {
	b, _ := policies.FS.ReadFile("input.schema.json")
	return b
}

func compileDir(dir string) (*policy.Revision, error) {
	f, err := policy.FromDir(dir)
	if err != nil {
		return nil, err
	}
	return policy.Compile(context.Background(), f, schema())
}

func policyCheck(cmd *cobra.Command, dir string, inputs []string) error {
	ctx := context.Background()
	w := cmd.OutOrStdout()
	f, err := policy.FromDir(dir)
	if err != nil {
		return err
	}
	rev, err := policy.Compile(ctx, f, schema())
	if err != nil {
		return err
	}
	probes := policy.StandardProbes(timeNow())
	for _, path := range inputs {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		in, err := policy.DecodeInput(b)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		probes = append(probes, in)
	}
	if err := policy.Check(ctx, rev, probes); err != nil {
		return err
	}
	fmt.Fprintf(w, "revision %s compiles and decides %d probe inputs\n", rev.ID, len(probes))
	results, err := policy.RunTests(ctx, f)
	if err != nil {
		return err
	}
	failed := 0
	for _, r := range results {
		if !r.Pass {
			failed++
			fmt.Fprintf(w, "FAIL %s.%s (%s) %s\n", r.Package, r.Name, r.Location, r.Err)
		}
	}
	fmt.Fprintf(w, "%d Rego tests, %d failed\n", len(results), failed)
	if failed > 0 {
		return errors.New("policy tests failed")
	}
	return nil
}
