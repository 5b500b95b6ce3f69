package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FastSignOptions configures Authority.EnableFastSign.
type FastSignOptions struct {
	// Logger gets the canary's result and any failed post-sign check. Nil
	// discards.
	Logger *slog.Logger
	// OnCheckFailure, when set, is called once per failed canary or sampled
	// post-sign check, so that the caller can count it in a metric. It must
	// not block: it runs on the signing path.
	OnCheckFailure func(error)

	// mutate, when set, is applied to the fast-path state before the
	// canary: the tests' way of making the fast path wrong.
	mutate func(*ecFastPath)
}

// canaryPath is the SPIFFE ID path of the canary SVID; the canary is never
// returned or recorded anywhere.
const canaryPath = "/meshid/fastsign-canary"

// EnableFastSign lets SignX509SVID skip x509.CreateCertificate's post-sign
// self-verification for this Authority (see fastsign.go). It is off unless
// called. It applies only to an in-process P-256 or P-384 ECDSA key matching
// the certificate; for anything else, or when the canary fails, it returns an
// error and signing stays on CreateCertificate. The canary runs again
// whenever Cert or Chain is replaced.
func (a *Authority) EnableFastSign(opts FastSignOptions) error {
	o := opts
	a.state.fastOpts.Store(&o)
	c, err := a.prepare()
	if err != nil {
		return fmt.Errorf("enable fast signing: %w", err)
	}
	if c.fast == nil {
		return fmt.Errorf("enable fast signing: %w", c.fastErr)
	}
	return nil
}

// FastSignActive reports whether SVIDs of this Authority currently take the
// fast path: EnableFastSign succeeded and no sampled check has failed since.
func (a *Authority) FastSignActive() bool {
	c, err := a.prepare()
	return err == nil && c.fast.usable(a.Key)
}

// buildFastPath makes the fast-path state for a's current certificate and
// key and runs the canary. On failure it returns the reason; the failure is
// also logged and reported, since prepare's callers only see it as
// CreateCertificate being used.
func (a *Authority) buildFastPath(leafSubject []byte, opts *FastSignOptions) (*ecFastPath, error) {
	f := newECFastPath(a.Cert, a.Key, leafSubject)
	if f == nil {
		// Not a check failure: the key is simply not one the fast path
		// serves (RSA, opaque signer, other curve).
		return nil, fmt.Errorf("CA key %T is not an in-process P-256/P-384 ECDSA key matching the certificate; signing with x509.CreateCertificate", a.Key)
	}
	if opts.mutate != nil {
		opts.mutate(f)
	}
	if err := fastCanary(a.Cert, a.Key, a.TrustDomain, f, leafSubject); err != nil {
		opts.report(a.Cert, err)
		return nil, err
	}
	opts.logger().LogAttrs(context.Background(), slog.LevelInfo, "fast SVID signing enabled; canary matched x509.CreateCertificate",
		slog.String("ca_subject", a.Cert.Subject.String()))
	return f, nil
}

func (o *FastSignOptions) logger() *slog.Logger {
	if o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

// report logs a failed check and hands it to OnCheckFailure.
func (o *FastSignOptions) report(caCert *x509.Certificate, err error) {
	o.logger().LogAttrs(context.Background(), slog.LevelError, "fast SVID signing turned off; signing with x509.CreateCertificate",
		slog.String("ca_subject", caCert.Subject.String()), slog.String("error", err.Error()))
	if o.OnCheckFailure != nil {
		o.OnCheckFailure(err)
	}
}

// fastCanary signs one SVID with the fast path and with CreateCertificate,
// both with a nil rand so ECDSA signs deterministically (RFC 6979), and
// requires the two certificates to be byte-identical and to verify under the
// CA certificate.
func fastCanary(caCert *x509.Certificate, key crypto.Signer, td spiffeid.TrustDomain, f *ecFastPath, leafSubject []byte) error {
	id, err := spiffeid.FromPath(td, canaryPath)
	if err != nil {
		return fmt.Errorf("%w: canary ID: %w", errFastSignCheck, err)
	}
	sub, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("%w: canary key: %w", errFastSignCheck, err)
	}
	serial, err := newSerial()
	if err != nil {
		return fmt.Errorf("%w: canary serial: %w", errFastSignCheck, err)
	}
	skid, err := subjectKeyID(sub.Public())
	if err != nil {
		return fmt.Errorf("%w: canary SKID: %w", errFastSignCheck, err)
	}
	// Inside the CA's validity, whenever the canary runs.
	nb := caCert.NotBefore
	na := nb.Add(svidClockSkew + 1)
	if na.After(caCert.NotAfter) {
		na = caCert.NotAfter
	}
	in := &svidFields{
		serial: serial, notBefore: nb, notAfter: na, pub: sub.Public(), skid: skid,
		keyUsage: x509.KeyUsageDigitalSignature, uri: id.String(),
		dnsNames: []string{"fastsign-canary.meshid.invalid"},
	}
	got, err := f.sign(nil, in)
	if err != nil {
		return fmt.Errorf("%w: canary: %w", errFastSignCheck, err)
	}
	if err := checkFastSVID(got, caCert, in.uri, in.pub); err != nil {
		return fmt.Errorf("canary: %w", err)
	}
	tmpl := svidTemplate(leafSubject, serial, nb, na, skid, in.keyUsage, id, in.dnsNames)
	want, err := x509.CreateCertificate(nil, tmpl, caCert, in.pub, key)
	if err != nil {
		return fmt.Errorf("%w: canary: reference certificate: %w", errFastSignCheck, err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		return fmt.Errorf("%w: canary differs from x509.CreateCertificate's at byte %d (lengths %d and %d)", errFastSignCheck, i, len(got), len(want))
	}
	return nil
}

// fastSampled reports whether the n-th fast-path signature (counting from
// 1) is one the post-sign check looks at.
func fastSampled(n uint64) bool { return n%fastVerifyEvery == 1 }
