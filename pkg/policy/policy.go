// Package policy evaluates tether's Rego policy (package tether) with OPA embedded as a library:
// grants (what an agent may do now), stepup, respond and the reference decision allow. A policy
// revision is parsed, type-checked against the input schema and compiled once, and its queries
// are prepared once; evaluations then only run them. A revision that does not parse, compile, or
// give well-formed results for the probe inputs is refused with file:line and the reason, and the
// revision in force stays. Grants go to pkg/compile; OPA is never on the per-syscall path.
//
// This is tether's only importer of OPA.
package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/loader"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/util"

	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/grants"
)

// Files is the content of one policy revision: Rego modules and data.
type Files struct {
	Modules map[string]*ast.Module
	Tests   map[string]*ast.Module // *_test.rego, for `policy check` and go test
	Data    map[string]any
	// Revision names the content: a bundle's manifest revision, or a digest of the files.
	Revision string
	Source   string
}

// FromDir reads the .rego and data files below dir (OPA's loader: data.json in a subdirectory
// lands at that path of data), hidden directories left out.
func FromDir(dir string) (*Files, error) {
	return load(loader.NewFileLoader(), dir, []string{dir})
}

// FromFS reads the .rego and data files of fsys (rooted at ".").
func FromFS(fsys fs.FS, source string) (*Files, error) {
	return load(loader.NewFileLoader().WithFS(fsys), source, []string{"."})
}

func load(fl loader.FileLoader, source string, paths []string) (*Files, error) {
	res, err := fl.WithRegoVersion(ast.RegoV1).WithProcessAnnotation(true).
		Filtered(paths, func(abspath string, info fs.FileInfo, depth int) bool {
			// Only Rego and data: the input schema and anything else stay out of data. Hidden
			// directories too: a Kubernetes ConfigMap volume holds its files in ..<timestamp>/,
			// with ..data and the files themselves symbolic links to them (each would be loaded
			// three times).
			name := info.Name()
			if info.IsDir() {
				return depth > 0 && strings.HasPrefix(name, ".")
			}
			return !strings.HasSuffix(name, ".rego") && name != "data.json" && name != "data.yaml"
		})
	if err != nil {
		return nil, fmt.Errorf("loading policy from %s: %s", source, loadError(err))
	}
	f := &Files{Modules: map[string]*ast.Module{}, Tests: map[string]*ast.Module{}, Data: res.Documents, Source: source}
	h := sha256.New()
	names := make([]string, 0, len(res.Modules))
	for name := range res.Modules {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		m := res.Modules[name]
		h.Write([]byte(name))
		h.Write(m.Raw)
		if strings.HasSuffix(name, "_test.rego") {
			f.Tests[name] = m.Parsed
		} else {
			f.Modules[name] = m.Parsed
		}
	}
	data, _ := json.Marshal(f.Data)
	h.Write(data)
	f.Revision = hex.EncodeToString(h.Sum(nil))[:12]
	return f, nil
}

// WithDataOf is f's Rego with the data of dir (its data.json and data.yaml files, as FromDir
// reads them) in place of f's: a revision of its own. dir holding Rego is an error (that is a
// policy directory).
func (f *Files) WithDataOf(dir string) (*Files, error) {
	d, err := FromDir(dir)
	if err != nil {
		return nil, err
	}
	if len(d.Modules)+len(d.Tests) > 0 {
		return nil, fmt.Errorf("policy data in %s: it holds Rego; a policy of its own is policy.dir", dir)
	}
	if len(d.Data) == 0 {
		return nil, fmt.Errorf("policy data in %s: no data.json or data.yaml", dir)
	}
	out := &Files{Modules: f.Modules, Tests: f.Tests, Data: d.Data, Source: f.Source + " with the data of " + dir}
	h := sha256.Sum256([]byte(f.Revision + d.Revision))
	out.Revision = hex.EncodeToString(h[:])[:12]
	return out, nil
}

// FromBundle takes the modules and data of an OPA bundle.
func FromBundle(b *bundle.Bundle, source string) *Files {
	f := &Files{Modules: map[string]*ast.Module{}, Tests: map[string]*ast.Module{}, Data: b.Data, Source: source}
	h := sha256.New()
	for _, m := range b.Modules {
		h.Write([]byte(m.Path))
		h.Write(m.Raw)
		if strings.HasSuffix(m.Path, "_test.rego") {
			f.Tests[m.Path] = m.Parsed
		} else {
			f.Modules[m.Path] = m.Parsed
		}
	}
	data, _ := json.Marshal(f.Data)
	h.Write(data)
	f.Revision = hex.EncodeToString(h.Sum(nil))[:12]
	if b.Manifest.Revision != "" {
		f.Revision = b.Manifest.Revision + "+" + f.Revision[:8]
	}
	return f
}

// loadError prints loader errors (parse errors carry file:row:col) one per line.
func loadError(err error) string {
	var errs loader.Errors
	if errors.As(err, &errs) {
		var lines []string
		for _, e := range errs {
			lines = append(lines, e.Error())
		}
		return strings.Join(lines, "\n")
	}
	return err.Error()
}

// Revision is one compiled policy with its prepared queries.
type Revision struct {
	ID       string
	Source   string
	Loaded   time.Time
	compiler *ast.Compiler
	store    storage.Store
	queries  map[string]rego.PreparedEvalQuery
	files    *Files
}

// The decisions of package tether.
const (
	QueryGrants  = "data.tether.grants"
	QueryStepup  = "data.tether.stepup"
	QueryRespond = "data.tether.respond"
	QueryAllow   = "data.tether.allow"
)

// Compile type-checks f against the input schema (JSON Schema) and prepares its queries.
func Compile(ctx context.Context, f *Files, inputSchema []byte) (*Revision, error) {
	ss := ast.NewSchemaSet()
	if len(inputSchema) > 0 {
		var schema any
		if err := util.UnmarshalJSON(inputSchema, &schema); err != nil {
			return nil, fmt.Errorf("input schema: %w", err)
		}
		ss.Put(ast.SchemaRootRef, schema)
	}
	compiler := ast.NewCompiler().WithSchemas(ss).WithEnablePrintStatements(false)
	if compiler.Compile(f.Modules); compiler.Failed() {
		return nil, fmt.Errorf("compiling the policy of %s:\n%s", f.Source, astErrors(compiler.Errors))
	}
	for _, q := range []string{QueryGrants, QueryStepup, QueryRespond, QueryAllow} {
		if len(compiler.GetRulesExact(ast.MustParseRef(q))) == 0 {
			return nil, fmt.Errorf("compiling the policy of %s: it defines no %s", f.Source, q)
		}
	}
	// Data read as AST values: not converted again on every evaluation.
	store := inmem.NewFromObjectWithOpts(f.Data, inmem.OptReturnASTValuesOnRead(true))
	r := &Revision{ID: f.Revision, Source: f.Source, Loaded: time.Now(), compiler: compiler, store: store,
		queries: map[string]rego.PreparedEvalQuery{}, files: f}
	for _, q := range []string{QueryGrants, QueryStepup, QueryRespond, QueryAllow} {
		pq, err := rego.New(rego.Query(q), rego.Compiler(compiler), rego.Store(store)).PrepareForEval(ctx)
		if err != nil {
			return nil, fmt.Errorf("preparing %s: %w", q, err)
		}
		r.queries[q] = pq
	}
	return r, nil
}

func astErrors(errs ast.Errors) string {
	lines := make([]string, 0, len(errs))
	for _, e := range errs {
		loc := ""
		if e.Location != nil {
			loc = fmt.Sprintf("%s:%d: ", e.Location.File, e.Location.Row)
		}
		lines = append(lines, loc+e.Message)
	}
	return strings.Join(lines, "\n")
}

// Errors of an evaluation. Each of OPA's four outcomes other than a good value is its own error:
// undefined, a value of the wrong type, and an evaluation error (which names file:line).
var (
	ErrUndefined = errors.New("undefined: the policy gave no value")
	ErrWrongType = errors.New("the policy's value has the wrong type")
)

// eval runs query q for in and returns its one value (a Go value; with asAST, the ast.Value).
func (r *Revision) eval(ctx context.Context, q string, in any, opts ...rego.EvalOption) (any, error) {
	rs, err := r.queries[q].Eval(ctx, append(opts, rego.EvalInput(in))...)
	if err != nil {
		return nil, fmt.Errorf("%s (revision %s): %s", q, r.ID, evalError(err))
	}
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return nil, fmt.Errorf("%s (revision %s): %w", q, r.ID, ErrUndefined)
	}
	return rs[0].Expressions[0].Value, nil
}

func evalError(err error) string {
	var te *topdown.Error
	if errors.As(err, &te) && te.Location != nil {
		return fmt.Sprintf("%s:%d: %s", te.Location.File, te.Location.Row, te.Message)
	}
	return err.Error()
}

// asAST has a query's result handed over as OPA's own value, unconverted.
var asAST = rego.EvalGenerateJSON(func(t *ast.Term, _ *rego.EvalContext) (any, error) { return t.Value, nil })

// Grants evaluates data.tether.grants.
func (r *Revision) Grants(ctx context.Context, in Input) (grants.Grants, error) {
	v, err := r.eval(ctx, QueryGrants, in, asAST)
	if err != nil {
		return grants.Grants{}, err
	}
	g, err := decodeGrants(v.(ast.Value))
	if err != nil {
		return g, fmt.Errorf("%s (revision %s): %w: %v", QueryGrants, r.ID, ErrWrongType, err)
	}
	return g, nil
}

// StepupDecision is data.tether.stepup.
type StepupDecision struct {
	Allowed       bool   `json:"allowed"`
	NeedsApproval bool   `json:"needs_approval"`
	TTL           string `json:"ttl,omitempty"`
	Reason        string `json:"reason,omitempty"`
}

// Stepup evaluates data.tether.stepup; in carries Request.
func (r *Revision) Stepup(ctx context.Context, in Input) (StepupDecision, error) {
	var d StepupDecision
	v, err := r.eval(ctx, QueryStepup, in)
	if err != nil {
		return d, err
	}
	if err := decodeStrict(v, &d); err != nil {
		return d, fmt.Errorf("%s (revision %s): %w: %v", QueryStepup, r.ID, ErrWrongType, err)
	}
	if d.TTL != "" {
		if _, err := time.ParseDuration(d.TTL); err != nil {
			return d, fmt.Errorf("%s (revision %s): %w: ttl %q is not a duration", QueryStepup, r.ID, ErrWrongType, d.TTL)
		}
	}
	return d, nil
}

// Respond evaluates data.tether.respond; in carries Event and Recent.
func (r *Revision) Respond(ctx context.Context, in Input) (events.Response, error) {
	v, err := r.eval(ctx, QueryRespond, in)
	if err != nil {
		return "", err
	}
	s, _ := v.(string)
	switch resp := events.Response(s); resp {
	case events.ResponseNone, events.ResponseAlert, events.ResponseFreeze, events.ResponseKill:
		return resp, nil
	}
	return "", fmt.Errorf("%s (revision %s): %w: %v is not none, alert, freeze or kill", QueryRespond, r.ID, ErrWrongType, v)
}

// Allow evaluates data.tether.allow; in carries Request.
func (r *Revision) Allow(ctx context.Context, in Input) (bool, error) {
	v, err := r.eval(ctx, QueryAllow, in)
	if err != nil {
		return false, err
	}
	b, ok := v.(bool)
	if !ok {
		return false, fmt.Errorf("%s (revision %s): %w: %v is not a boolean", QueryAllow, r.ID, ErrWrongType, v)
	}
	return b, nil
}

// decodeStrict moves an OPA value into out; unknown fields are errors.
func decodeStrict(v any, out any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	return d.Decode(out)
}
