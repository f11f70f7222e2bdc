output "service_url" {
  description = "URL of the worker (authenticated: callers need roles/run.invoker)."
  value       = google_cloud_run_v2_service.worker.uri
}

output "jobs_topic" {
  description = "Publish job messages here."
  value       = google_pubsub_topic.jobs.name
}

output "results_topic" {
  description = "Completion messages arrive here."
  value       = google_pubsub_topic.results.name
}

output "results_subscription" {
  description = "Pull completion messages from here."
  value       = google_pubsub_subscription.results_reader.name
}

output "dead_letter_topic" {
  description = "Job messages that failed max_delivery_attempts times."
  value       = google_pubsub_topic.dead_letter.name
}

output "worker_service_account" {
  description = "Identity the worker runs as (grant it access to any further model bucket)."
  value       = google_service_account.worker.email
}

output "drop_prefix" {
  description = "Upload input files here to start jobs."
  value       = "gs://${var.input_bucket}/${var.input_prefix}"
}
