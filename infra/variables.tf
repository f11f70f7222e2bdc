variable "project_id" {
  description = "Google Cloud project that runs the worker."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID (6-30 lowercase letters, digits and hyphens), not its name or number."
  }
}

variable "region" {
  description = "Region of the Cloud Run service and the jobs trigger."
  type        = string
  default     = "us-central1"
}

variable "name" {
  description = "Name of the Cloud Run service; also the prefix of topics, subscriptions and service accounts."
  type        = string
  default     = "embedded-tf"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name must be 3-21 lowercase letters, digits or hyphens, starting with a letter (service account IDs derive from it)."
  }
}

variable "image" {
  description = "Container image built from the repository's Dockerfile, e.g. REGION-docker.pkg.dev/PROJECT/REPO/embedded-tf:TAG."
  type        = string
  validation {
    condition     = length(var.image) > 0 && !endswith(var.image, ":latest")
    error_message = "image must be set, to a tag or digest other than :latest, so a deploy is reproducible."
  }
}

variable "model_buckets" {
  description = "Buckets holding SavedModels; the worker may read them."
  type        = list(string)
  validation {
    condition     = length(var.model_buckets) > 0 && alltrue([for b in var.model_buckets : can(regex("^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", b))])
    error_message = "model_buckets must list at least one bucket name (no gs:// prefix)."
  }
}

variable "input_bucket" {
  description = "Bucket whose finalized objects under input_prefix start jobs (Eventarc storage trigger); the worker may read it."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", var.input_bucket))
    error_message = "input_bucket must be a bucket name (no gs:// prefix)."
  }
}

variable "input_bucket_location" {
  description = "Location of input_bucket (the storage trigger must be there). Empty: the same as region."
  type        = string
  default     = ""
}

variable "input_prefix" {
  description = "Only objects under this prefix of input_bucket are input files (WORKER_INPUT). Empty for the whole bucket."
  type        = string
  default     = "in/"
  validation {
    condition     = var.input_prefix == "" || endswith(var.input_prefix, "/")
    error_message = "input_prefix must be empty or end with /."
  }
}

variable "output_bucket" {
  description = "Bucket the worker writes predictions, manifests and leases to (may equal input_bucket)."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", var.output_bucket))
    error_message = "output_bucket must be a bucket name (no gs:// prefix)."
  }
}

variable "output_prefix" {
  description = "Prefix of output_bucket for dropped files' predictions (WORKER_OUTPUT); never read as input."
  type        = string
  default     = "out/"
  validation {
    condition     = endswith(var.output_prefix, "/") && var.output_prefix != "/"
    error_message = "output_prefix must be a non-empty prefix ending with /."
  }
}

variable "default_model" {
  description = "gs:// model for dropped files without `model` metadata (WORKER_MODEL). Empty: files must carry it."
  type        = string
  default     = ""
  validation {
    condition     = var.default_model == "" || startswith(var.default_model, "gs://")
    error_message = "default_model must be empty or a gs:// URI."
  }
}

variable "cpu" {
  description = "vCPUs per instance. Prediction is CPU-bound: this sets the throughput of one instance."
  type        = string
  default     = "2"
  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.cpu)
    error_message = "cpu must be one of 1, 2, 4, 6, 8."
  }
}

variable "memory" {
  description = "Memory per instance: about 1 GiB for TensorFlow, plus each warm model's size (twice, for TF Serving), plus a batch per concurrent job."
  type        = string
  default     = "4Gi"
  validation {
    condition     = can(regex("^[0-9]+(Mi|Gi)$", var.memory))
    error_message = "memory must look like 4Gi or 2048Mi."
  }
}

variable "concurrency" {
  description = "Jobs one instance runs at once. About one per vCPU: more only makes each job slower."
  type        = number
  default     = 1
  validation {
    condition     = var.concurrency >= 1 && var.concurrency <= 16
    error_message = "concurrency must be between 1 and 16."
  }
}

variable "timeout_seconds" {
  description = "Longest job (one request). Pub/Sub stops waiting after 600 s and redelivers; the job's lease makes the redelivery wait."
  type        = number
  default     = 3600
  validation {
    condition     = var.timeout_seconds >= 60 && var.timeout_seconds <= 3600
    error_message = "timeout_seconds must be between 60 and 3600 (Cloud Run's limit)."
  }
}

variable "min_instances" {
  description = "Instances kept warm (model loaded between jobs). 0 scales to zero when idle."
  type        = number
  default     = 0
  validation {
    condition     = var.min_instances >= 0
    error_message = "min_instances must not be negative."
  }
}

variable "max_instances" {
  description = "Upper bound on instances, hence on parallel jobs and on cost."
  type        = number
  default     = 10
  validation {
    condition     = var.max_instances >= 1 && var.max_instances <= 1000
    error_message = "max_instances must be between 1 and 1000."
  }
}

variable "max_delivery_attempts" {
  description = "Deliveries of a job message before it goes to the dead-letter topic."
  type        = number
  default     = 10
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "max_delivery_attempts must be between 5 and 100 (Pub/Sub's limits)."
  }
}

variable "worker_env" {
  description = "More worker settings (docs/configuration.md), e.g. { WORKER_BATCH_SIZE = \"128\" }."
  type        = map(string)
  default     = {}
  validation {
    condition     = alltrue([for k in keys(var.worker_env) : startswith(k, "WORKER_")])
    error_message = "worker_env keys must be WORKER_* settings."
  }
}

variable "kms_key_name" {
  description = "Cloud KMS key (projects/P/locations/L/keyRings/R/cryptoKeys/K) for the topics; null for Google-managed encryption."
  type        = string
  default     = null
}

variable "jobs_via_eventarc" {
  description = "Deliver job messages with an Eventarc messagePublished trigger instead of the push subscription (which has the 600 s ack deadline and the dead-letter topic)."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Refuse to destroy the Cloud Run service; set to false (and apply) before terraform destroy."
  type        = bool
  default     = true
}
