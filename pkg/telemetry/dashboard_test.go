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
// dashboards/tether.json) and the alerting rules (its rules/tether.rules.yaml) query is one this
// registry serves (histograms by their _bucket series).
func TestDashboardUsesOnlyTetherMetrics(t *testing.T) {
	b, err := os.ReadFile("../../deploy/helm/tether/dashboards/tether.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
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
	metric := regexp.MustCompile(`\btether_[a-z_]+`)
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
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
