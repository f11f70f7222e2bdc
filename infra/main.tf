data "google_project" "this" {}

data "google_storage_project_service_account" "gcs" {}

locals {
  pubsub_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  memory_mib   = endswith(var.memory, "Gi") ? tonumber(trimsuffix(var.memory, "Gi")) * 1024 : tonumber(trimsuffix(var.memory, "Mi"))
  worker_env = merge(
    {
      GOOGLE_CLOUD_PROJECT = var.project_id
      WORKER_RESULTS_TOPIC = google_pubsub_topic.results.id
      WORKER_JOBS_TOPIC    = google_pubsub_topic.jobs.id # a job with options.parts goes out again as its parts
      WORKER_INPUT         = "gs://${var.input_bucket}/${var.input_prefix}"
      WORKER_OUTPUT        = "gs://${var.output_bucket}/${var.output_prefix}"
      WORKER_MODEL         = var.default_model
      WORKER_WORK_DIR      = "/tmp/embedded-tf"
      # The job subscription's last delivery publishes FAILED for a job still failing transiently.
      WORKER_MAX_DELIVERY_ATTEMPTS = tostring(var.max_delivery_attempts)
      # Local files live in memory on Cloud Run: warm models' files get a quarter of it.
      WORKER_MAX_MODEL_DISK_MB = tostring(floor(local.memory_mib / 4))
    },
    var.worker_env,
  )
}

# -- identities ---------------------------------------------------------------------------------

# The worker runs as this account. It holds no project-wide role: only the bucket and topic
# grants below.
resource "google_service_account" "worker" {
  account_id   = "${var.name}-worker"
  display_name = "embedded-tf worker (Cloud Run)"
}

# Pub/Sub push and Eventarc deliver events with this identity; it may only invoke the service.
resource "google_service_account" "invoker" {
  account_id   = "${var.name}-invoker"
  display_name = "embedded-tf event delivery (Pub/Sub push, Eventarc)"
}

resource "google_storage_bucket_iam_member" "models_read" {
  for_each = toset(var.model_buckets)
  bucket   = each.value
  role     = "roles/storage.objectViewer"
  member   = google_service_account.worker.member
}

resource "google_storage_bucket_iam_member" "input_read" {
  bucket = var.input_bucket
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker.member
}

# Outputs, manifests and leases: create, overwrite (with preconditions) and delete objects.
resource "google_storage_bucket_iam_member" "output_write" {
  bucket = var.output_bucket
  role   = "roles/storage.objectUser"
  member = google_service_account.worker.member
}

resource "google_pubsub_topic_iam_member" "results_publish" {
  topic  = google_pubsub_topic.results.id
  role   = "roles/pubsub.publisher"
  member = google_service_account.worker.member
}

# The parts of a job run as parts (options.parts) go out on the jobs topic.
resource "google_pubsub_topic_iam_member" "jobs_publish" {
  topic  = google_pubsub_topic.jobs.id
  role   = "roles/pubsub.publisher"
  member = google_service_account.worker.member
}

resource "google_cloud_run_v2_service_iam_member" "invoker" {
  name     = google_cloud_run_v2_service.worker.name
  location = google_cloud_run_v2_service.worker.location
  role     = "roles/run.invoker"
  member   = google_service_account.invoker.member
}

# Eventarc's trigger identity must be allowed to receive events (Eventarc's requirement).
resource "google_project_iam_member" "invoker_event_receiver" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.invoker.member
}

# Cloud Storage's service agent publishes the object events Eventarc delivers (Eventarc's requirement).
resource "google_project_iam_member" "gcs_agent_publisher" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Pub/Sub's service agent signs push tokens and moves undeliverable jobs to the dead-letter topic.
resource "google_service_account_iam_member" "pubsub_token_creator" {
  service_account_id = google_service_account.invoker.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

resource "google_pubsub_topic_iam_member" "dead_letter_publish" {
  topic  = google_pubsub_topic.dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "jobs_dead_letter_forward" {
  count        = var.jobs_via_eventarc ? 0 : 1
  subscription = google_pubsub_subscription.jobs_push[0].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

# -- topics ---------------------------------------------------------------------------------------

resource "google_pubsub_topic" "jobs" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption unless var.kms_key_name names a customer key.
  name         = "${var.name}-jobs"
  kms_key_name = var.kms_key_name
}

resource "google_pubsub_topic" "results" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption unless var.kms_key_name names a customer key.
  name         = "${var.name}-results"
  kms_key_name = var.kms_key_name
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83:Google-managed encryption unless var.kms_key_name names a customer key.
  name         = "${var.name}-dead-letter"
  kms_key_name = var.kms_key_name
}

# So completion messages and dead letters can be read (`gcloud pubsub subscriptions pull …`).
resource "google_pubsub_subscription" "results_reader" {
  name                       = "${var.name}-results-reader"
  topic                      = google_pubsub_topic.results.id
  message_retention_duration = "604800s"
}

resource "google_pubsub_subscription" "dead_letter_reader" {
  name                       = "${var.name}-dead-letter-reader"
  topic                      = google_pubsub_topic.dead_letter.id
  message_retention_duration = "604800s"
}

# -- the service ----------------------------------------------------------------------------------

resource "google_cloud_run_v2_service" "worker" {
  name     = var.name
  location = var.region
  ingress  = "INGRESS_TRAFFIC_INTERNAL_ONLY" # Pub/Sub push and Eventarc count as internal

  deletion_protection = var.deletion_protection

  template {
    service_account                  = google_service_account.worker.email
    timeout                          = "${var.timeout_seconds}s"
    max_instance_request_concurrency = var.concurrency
    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }
    containers {
      image = var.image
      resources {
        limits = {
          cpu    = var.cpu
          memory = var.memory
        }
        cpu_idle = true
        # More CPU while an instance starts: the Python runtime, the worker and its first model.
        startup_cpu_boost = true
      }
      dynamic "env" {
        for_each = { for k, v in local.worker_env : k => v if v != "" }
        content {
          name  = env.key
          value = env.value
        }
      }
    }
  }
}

# -- delivery -------------------------------------------------------------------------------------

# Job messages: a push subscription rather than an Eventarc messagePublished trigger, because
# Eventarc manages its own subscription, whose ack deadline and dead-letter policy Terraform cannot
# set. Authenticated push (OIDC as the invoker account), 600 s ack deadline (the most Pub/Sub
# allows; longer jobs are redelivered and wait on the job's lease), backoff, dead-letter topic.
resource "google_pubsub_subscription" "jobs_push" {
  count                      = var.jobs_via_eventarc ? 0 : 1
  name                       = "${var.name}-jobs-push"
  topic                      = google_pubsub_topic.jobs.id
  ack_deadline_seconds       = 600
  message_retention_duration = "86400s"

  push_config {
    push_endpoint = google_cloud_run_v2_service.worker.uri
    oidc_token {
      service_account_email = google_service_account.invoker.email
      audience              = google_cloud_run_v2_service.worker.uri
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  depends_on = [google_cloud_run_v2_service_iam_member.invoker]
}

# Files dropped under input_prefix: Eventarc's direct Cloud Storage events (retried by Eventarc
# for up to 24 hours on a 5xx; the worker answers 2xx with a FAILED report for bad input).
resource "google_eventarc_trigger" "object_finalized" {
  name            = "${var.name}-object-finalized"
  location        = var.input_bucket_location != "" ? var.input_bucket_location : var.region
  service_account = google_service_account.invoker.email

  matching_criteria {
    attribute = "type"
    value     = "google.cloud.storage.object.v1.finalized"
  }
  matching_criteria {
    attribute = "bucket"
    value     = var.input_bucket
  }

  destination {
    cloud_run_service {
      service = google_cloud_run_v2_service.worker.name
      region  = var.region
    }
  }

  depends_on = [
    google_project_iam_member.invoker_event_receiver,
    google_project_iam_member.gcs_agent_publisher,
    google_cloud_run_v2_service_iam_member.invoker,
  ]
}

# Alternative for job messages (jobs_via_eventarc = true): an Eventarc messagePublished trigger on
# the jobs topic. Eventarc creates and manages its subscription, so the 600 s ack deadline and the
# dead-letter policy above do not apply to it.
resource "google_eventarc_trigger" "jobs_published" {
  count           = var.jobs_via_eventarc ? 1 : 0
  name            = "${var.name}-jobs-published"
  location        = var.region
  service_account = google_service_account.invoker.email

  matching_criteria {
    attribute = "type"
    value     = "google.cloud.pubsub.topic.v1.messagePublished"
  }

  transport {
    pubsub {
      topic = google_pubsub_topic.jobs.id
    }
  }

  destination {
    cloud_run_service {
      service = google_cloud_run_v2_service.worker.name
      region  = var.region
    }
  }

  depends_on = [
    google_project_iam_member.invoker_event_receiver,
    google_cloud_run_v2_service_iam_member.invoker,
  ]
}
