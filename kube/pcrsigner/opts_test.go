package pcrsigner_test

import metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

func metav1UpdateOptions() metav1.UpdateOptions { return metav1.UpdateOptions{} }
func metav1GetOptions() metav1.GetOptions       { return metav1.GetOptions{} }
