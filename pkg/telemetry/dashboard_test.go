package telemetry

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestDashboardUsesOnlyTetherMetrics: every metric the Grafana dashboard (the chart's
// dashboards/tether.json) queries is one this registry serves, every query follows its variables,
// and every panel has one unit.
func TestDashboardUsesOnlyTetherMetrics(t *testing.T) {
	b, err := os.ReadFile("../../deploy/helm/tether/dashboards/tether.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title       string `json:"title"`
			FieldConfig struct {
				Defaults struct {
					Unit string `json:"unit"`
				} `json:"defaults"`
			} `json:"fieldConfig"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	served := servedMetrics(t)
	// Variables for the cluster, the node and the SPIFFE ID, which every query follows; one unit
	// per panel (a panel of seconds and counts misreads one of them).
	vars := map[string]bool{}
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
	}
	for _, v := range []string{"datasource", "cluster", "node", "spiffe_id"} {
		if !vars[v] {
			t.Errorf("the dashboard has no $%s variable", v)
		}
	}
	metric := regexp.MustCompile(`\btether_[a-z_]+`)
	n := 0
	for _, p := range dash.Panels {
		if p.FieldConfig.Defaults.Unit == "" {
			t.Errorf("panel %q has no unit", p.Title)
		}
		for _, tg := range p.Targets {
			if !strings.Contains(tg.Expr, `node=~"$node"`) || (strings.Contains(tg.Expr, "tether_decisions_total") && !strings.Contains(tg.Expr, `spiffe_id=~"$spiffe_id"`)) {
				t.Errorf("panel %q: %s does not follow the variables", p.Title, tg.Expr)
			}
			for _, name := range metric.FindAllString(tg.Expr, -1) {
				n++
				if !served[name] {
					t.Errorf("panel %q queries %s, which tether does not serve", p.Title, name)
				}
			}
		}
	}
	if n == 0 || !strings.Contains(string(b), "tether_decisions_total") {
		t.Fatal("the dashboard queries no tether metric")
	}
}

// TestAlertRulesUseOnlyTetherMetrics: every expression of the chart's alerting rules
// (rules/tether.rules.yaml) queries metrics this registry serves.
func TestAlertRulesUseOnlyTetherMetrics(t *testing.T) {
	served := servedMetrics(t)
	metric := regexp.MustCompile(`\btether_[a-z_]+`)
	rules, err := os.ReadFile("../../deploy/helm/tether/rules/tether.rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	exprs := regexp.MustCompile(`(?m)^\s+expr: (.*)$`).FindAllStringSubmatch(string(rules), -1)
	for _, e := range exprs {
		names := metric.FindAllString(e[1], -1)
		if len(names) == 0 {
			t.Errorf("the rule %q queries no tether metric", e[1])
		}
		for _, name := range names {
			if !served[name] {
				t.Errorf("the rule %q queries %s, which tether does not serve", e[1], name)
			}
		}
	}
	if len(exprs) < 5 {
		t.Fatalf("%d rules in the rule file", len(exprs))
	}
}

// servedMetrics are the names this registry serves (histograms by their _bucket series too).
func servedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	m := New(&fakeSource{kernel: KernelStats{Programs: map[string]dataplane.ProgramStat{"connect4": {}}}}, "test")
	m.ObserveEvaluation(0)
	served := map[string]bool{}
	families, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		served[f.GetName()] = true
		served[f.GetName()+"_bucket"] = true
	}
	// Collected only once observed or labelled: describe them from the collector's descriptors.
	for _, name := range []string{"tether_decisions_total", "tether_kill_step_duration_seconds_bucket", "tether_kills_total"} {
		served[name] = true
	}
	return served
}
