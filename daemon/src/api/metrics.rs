//! `GET /metrics`: the Prometheus text exposition of [`crate::metrics::global`]. Gauges whose
//! truth lives elsewhere (jobs by status in the database, adapters resident in the engine) are
//! recomputed at scrape time, so they can never drift from what the API reports.
use actix_web::{web, HttpRequest, HttpResponse};

use super::handlers::method_not_allowed;
use crate::engine::EngineHandle;
use crate::jobs::store::status;
use crate::jobs::Jobs;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(method_not_allowed)),
    );
}

const STATUSES: &[&str] = &[
    status::VALIDATING,
    status::QUEUED,
    status::RUNNING,
    status::PAUSED,
    status::SUCCEEDED,
    status::FAILED,
    status::CANCELLED,
];

/// `GET /metrics`.
pub async fn metrics(req: HttpRequest) -> HttpResponse {
    let m = crate::metrics::global();
    if let Some(engine) = req.app_data::<web::Data<EngineHandle>>() {
        if engine.is_ready() {
            let resident = engine
                .models()
                .iter()
                .filter(|c| c.parent.is_some() && c.resident)
                .count();
            m.set_adapters_resident(resident);
        }
    }
    if let Some(jobs) = req.app_data::<web::Data<Jobs>>() {
        // On a database error the last known values stay rather than dropping to zero.
        match jobs.count_jobs(STATUSES).await {
            Ok(counts) => m.set_training_jobs(&counts),
            Err(e) => tracing::warn!("metrics: counting jobs: {e}"),
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}
