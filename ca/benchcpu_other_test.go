//go:build !unix

package ca

import "testing"

// cpuPerOp reports nothing where getrusage is not available.
func cpuPerOp(*testing.B) func() { return func() {} }
