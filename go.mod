module github.com/attune/attune-notifier

go 1.26.0

require (
	github.com/lib/pq v1.12.3
	go.yaml.in/yaml/v3 v3.0.6
	golang.org/x/net v0.63.0
)
