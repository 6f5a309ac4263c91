package main

import (
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	s := summarize([]float64{5, 1, 4, 2, 3})
	if s.med != 3 || s.lo != 2 || s.hi != 4 {
		t.Errorf("summarize: %+v", s)
	}
	if s := summarize([]float64{1, 2}); s.med != 1.5 {
		t.Errorf("median of two: %+v", s)
	}
	if s := summarize(nil); !math.IsNaN(s.med) {
		t.Errorf("empty: %+v", s)
	}
}

func TestPaired(t *testing.T) {
	// Round by round: drift of the machine cancels.
	s := paired([]float64{110, 220, 330}, []float64{100, 200, 300}, relative)
	if math.Abs(s.med-10) > 1e-9 || math.Abs(s.lo-10) > 1e-9 {
		t.Errorf("paired relative: %+v", s)
	}
	if s := paired([]float64{1150, 1250}, []float64{1000, 1100}, absolute); s.med != 150 {
		t.Errorf("paired absolute: %+v", s)
	}
}

func TestRatio(t *testing.T) {
	if got := ratio(1000, 10); got != "100.0x" {
		t.Error(got)
	}
	if got := ratio(1000, -5); got != "tether within noise" {
		t.Error(got)
	}
}
