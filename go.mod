module github.com/attune/attune-notifier

go 1.26.8

require (
	github.com/lib/pq v1.12.3 // indirect
	go.yaml.in/yaml/v3 v3.0.6 // indirect
	golang.org/x/net v0.63.0 // indirect
)
