{{/* The seed's alerts, as Prometheus rule groups (the PrometheusRule's spec; the chart's test runs
     them through `promtool test rules`). Runbooks: docs/deployment.md, "Alerts". */}}
{{- define "aigw.alertGroups" -}}
{{- $a := .Values.monitoring.alerts -}}
groups:
- name: aigateway
  rules:
  - alert: AIGatewayHighErrorRate
    expr: |
      sum(rate(aigw_billing_requests_total{status=~"error|truncated"}[5m]))
        / sum(rate(aigw_billing_requests_total[5m])) > {{ $a.errorRate }}
    for: 3m
    labels: {severity: critical}
    annotations:
      summary: More than {{ mulf $a.errorRate 100 }}% of requests failed upstream for 3 minutes
      runbook: docs/deployment.md#aigatewayhigherrorrate
  - alert: AIGatewayChannelSuccessLow
    expr: |
      sum by (channel) (rate(aigw_billing_channel_requests_total{result="ok"}[5m]))
        / sum by (channel) (rate(aigw_billing_channel_requests_total[5m])) < {{ $a.channelSuccessRate }}
    for: 5m
    labels: {severity: warning}
    annotations:
      summary: 'Channel {{ "{{" }} $labels.channel {{ "}}" }} succeeds on less than {{ mulf $a.channelSuccessRate 100 }}% of requests'
      runbook: docs/deployment.md#aigatewaychannelsuccesslow
  - alert: AIGatewayConsumerLag
    expr: sum(aigw_billing_worker_consumer_lag) > {{ $a.consumerLag | int64 }}
    for: 5m
    labels: {severity: warning}
    annotations:
      summary: The billing worker is more than {{ $a.consumerLag | int64 }} usage events behind
      runbook: docs/deployment.md#aigatewayconsumerlag
  - alert: AIGatewayQuotaLow
    expr: sum by (tenant) (increase(aigw_billing_quota_alerts_total{kind="quotaLow"}[15m])) > 0
    labels: {severity: warning}
    annotations:
      summary: 'A token of tenant {{ "{{" }} $labels.tenant {{ "}}" }} has 10% or less of its quota left'
      runbook: docs/deployment.md#aigatewayquotalow
  - alert: AIGatewayDeadLetters
    expr: sum(increase(aigw_billing_worker_dead_lettered_total[10m])) > 0
    labels: {severity: warning}
    annotations:
      summary: Usage events went to the dead-letter topic (unbilled until a person prices them)
      runbook: docs/deployment.md#aigatewaydeadletters
{{- end -}}
