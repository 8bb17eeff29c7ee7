//! The status pages the daemon serves: plain HTML and CSS (no build step, no
//! CDN, works offline), readable at 1280 px and on a phone, dark text on light
//! with colour only for state. A small inline script refreshes the page's
//! content in place every few seconds, so the scroll position stays.
//!
//! What a view costs: the overview reads the job summaries (one List Blobs per
//! 5,000 job documents, whatever the jobs hold), a job page reads one
//! document, the pools page lists the pool records and reads each.

use crate::estimate::Timing;
use crate::state::ReplicaMethod;
use crate::state::{JobDocument, JobListing, JobState, JobSummary, PoolRecord, ReplicaRecord};
use crate::views::{human_bytes, human_duration, human_rate};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Running and queued jobs the overview lists.
pub(crate) const ACTIVE_SHOWN: usize = 100;
/// Finished jobs the overview lists, newest first.
pub(crate) const FINISHED_SHOWN: usize = 25;
/// A job page groups its replicas by account above this many.
pub(crate) const GROUP_ABOVE: usize = 40;
/// Seconds between refreshes.
const REFRESH_SECONDS: u32 = 5;

const CSS: &str = "\
:root{color-scheme:light;--fg:#1b1f24;--muted:#5b6570;--line:#d8dde3;--bg:#fff}\
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0}\
header{display:flex;flex-wrap:wrap;gap:.4em 1.5em;align-items:baseline;padding:.8em 1.2em;border-bottom:1px solid var(--line)}\
header h1{font-size:1.15em;margin:0}header a{color:var(--fg)}main{padding:0 1.2em 2em;max-width:1400px}\
h2{font-size:1.05em;margin:1.4em 0 .5em}a{color:var(--fg)}.muted{color:var(--muted)}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}\
th,td{padding:.35em .6em;text-align:left;border-bottom:1px solid var(--line);vertical-align:top;white-space:nowrap}\
th{font-weight:600;font-size:.85em;color:var(--muted)}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
td.err{max-width:34em;overflow:hidden;text-overflow:ellipsis}\
.bar{display:inline-block;width:8em;height:.6em;background:#e9edf1;border-radius:.3em;vertical-align:middle;overflow:hidden}\
.bar i{display:block;height:100%;background:#3d4752}.pct{display:inline-block;min-width:3.2em;text-align:right}\
.state{font-weight:600}.running{color:#0b62c4}.queued{color:#5b6570}.completed,.verified{color:#1a7f37}\
.failed{color:#b42318}.cancelled{color:#9a6700}.copying{color:#0b62c4}.pending{color:#5b6570}\
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(11em,1fr));gap:.6em 1.2em;margin:1em 0}\
.facts div b{display:block;font-size:.8em;color:var(--muted);font-weight:600}\
p.error{color:#b42318;white-space:pre-wrap}details{margin:.4em 0}summary{cursor:pointer}\
@media (max-width:700px){body{font-size:14px}.hide-sm{display:none}main{padding:0 .6em 2em}table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;border:0}table.cards tr:first-child{display:none}table.cards tr{border-bottom:1px solid var(--line);padding:.5em 0}table.cards td{padding:.1em 0;text-align:left;white-space:normal}table.cards td[data-k]::before{content:attr(data-k) ' ';color:var(--muted);font-size:.85em}table.cards td.hide-sm{display:none}}";

/// Refreshes `main` in place, keeping the scroll position and open groups.
const SCRIPT: &str = "\
setInterval(async()=>{try{const r=await fetch(location.href,{cache:'no-store'});if(!r.ok)return;\
const d=new DOMParser().parseFromString(await r.text(),'text/html');\
const open=[...document.querySelectorAll('details[open]')].map(e=>e.id);\
document.querySelector('main').replaceWith(d.querySelector('main'));\
open.forEach(i=>{const e=document.getElementById(i);if(e)e.open=true});\
document.getElementById('refreshed').textContent=d.getElementById('refreshed').textContent}catch(e){}},";

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn layout(title: &str, now: OffsetDateTime, body: &str) -> String {
    let at = format!(
        "{:02}:{:02}:{:02} UTC",
        now.hour(),
        now.minute(),
        now.second()
    );
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · vhd-replicator</title><style>{CSS}</style></head><body>\
         <header><h1><a href=\"/\">vhd-replicator</a></h1><a href=\"/\">jobs</a><a href=\"/pools\">pools</a>\
         <a href=\"/metrics\">metrics</a><span class=\"muted\">updated <span id=\"refreshed\">{at}</span>, every {REFRESH_SECONDS} s</span></header>\
         <main>{body}</main><script>{SCRIPT}{REFRESH_SECONDS}000)</script></body></html>",
        title = escape(title),
    )
}

/// A progress bar with its percentage.
fn bar(share: f64) -> String {
    let pct = (share.clamp(0.0, 1.0) * 100.0).floor();
    format!("<span class=\"bar\"><i style=\"width:{pct}%\"></i></span> <span class=\"pct\">{pct}%</span>")
}

/// State and phase in words, coloured by state.
fn state_words(state: JobState, phase: Option<crate::state::Phase>, cancel: bool) -> String {
    let mut s = format!("<span class=\"state {0}\">{0}</span>", state.as_str());
    if let Some(p) = phase {
        s.push_str(&format!(" · {}", p.words()));
    }
    if cancel && !state.is_terminal() {
        s.push_str(" · cancelling");
    }
    s
}

/// Throughput, elapsed and ETA, in words.
fn timing_parts(t: &Timing) -> [String; 3] {
    let rate = match (t.throughput_bytes_per_second, t.estimating) {
        (Some(r), _) => human_rate(r),
        (None, true) => "<span class=\"muted\">estimating</span>".to_owned(),
        (None, false) => "–".to_owned(),
    };
    let elapsed = t.elapsed_seconds.map_or("–".to_owned(), human_duration);
    let eta = match (t.eta_seconds, t.estimating) {
        (Some(s), _) => format!("<span class=\"eta\">{}</span>", human_duration(s)),
        (None, true) => "<span class=\"muted\">estimating</span>".to_owned(),
        (None, false) => "–".to_owned(),
    };
    [rate, elapsed, eta]
}

/// Throughput, elapsed and ETA cells.
fn timing_cells(t: &Timing) -> String {
    let [rate, elapsed, eta] = timing_parts(t);
    format!("<td class=\"num\" data-k=\"throughput\">{rate}</td><td class=\"num\" data-k=\"elapsed\">{elapsed}</td><td class=\"num\" data-k=\"ETA\">{eta}</td>")
}

/// A job's row; a finished job's has no throughput or ETA (it has none), so
/// its error has the room.
fn job_row(s: &JobSummary, now: OffsetDateTime) -> String {
    let error = s.error.as_deref().map_or(String::new(), |e| {
        let line = e.lines().next().unwrap_or_default();
        format!(
            "<span class=\"failed\" title=\"{}\">{}</span>",
            escape(e),
            escape(line)
        )
    });
    format!(
        "<tr class=\"job\" id=\"job-{id}\"><td><a href=\"/jobs/{id}\">{id}</a></td><td><a href=\"/?pool={pool}\">{pool}</a></td>\
         <td class=\"num\" data-k=\"nodes\">{nodes}</td><td>{state}</td><td>{bar}</td><td class=\"num\" data-k=\"copied\">{done} of {total}</td>{timing}<td class=\"err\">{error}</td></tr>",
        id = escape(&s.job_id),
        pool = escape(&s.pool_id),
        nodes = s.nodes,
        state = state_words(s.state, s.phase, s.cancel_requested),
        bar = bar(s.progress()),
        done = human_bytes(s.bytes_copied),
        total = human_bytes(s.bytes_total),
        timing = if s.state.is_terminal() {
            let [_, elapsed, _] = timing_parts(&s.timing(now));
            format!("<td class=\"num\" data-k=\"elapsed\">{elapsed}</td>")
        } else {
            timing_cells(&s.timing(now))
        },
    )
}

const JOB_HEAD: &str = "<div class=\"scroll\"><table class=\"cards\"><tr><th>job</th><th>pool</th><th class=\"num\">nodes</th><th>state</th><th>progress</th>\
<th class=\"num\">copied</th><th class=\"num\">throughput</th><th class=\"num\">elapsed</th><th class=\"num\">ETA</th><th>error</th></tr>";

const FINISHED_HEAD: &str = "<div class=\"scroll\"><table class=\"cards\"><tr><th>job</th><th>pool</th><th class=\"num\">nodes</th><th>state</th><th>progress</th>\
<th class=\"num\">copied</th><th class=\"num\">took</th><th>error</th></tr>";

/// A titled table of `jobs`, the first `shown` of them, the rest counted.
fn jobs_section(
    body: &mut String,
    title: &str,
    jobs: &[&JobSummary],
    shown: usize,
    none: &str,
    rest: &str,
    now: OffsetDateTime,
) {
    body.push_str(&format!(
        "<h2>{title} <span class=\"muted\">{}</span></h2>",
        jobs.len()
    ));
    if jobs.is_empty() {
        body.push_str(&format!("<p class=\"muted\">{none}</p>"));
        return;
    }
    body.push_str(if jobs[0].state.is_terminal() {
        FINISHED_HEAD
    } else {
        JOB_HEAD
    });
    for s in jobs.iter().take(shown) {
        body.push_str(&job_row(s, now));
    }
    body.push_str("</table></div>");
    if jobs.len() > shown {
        body.push_str(&format!(
            "<p class=\"muted\">and {} {rest} (GET /v1/jobs lists them all)</p>",
            jobs.len() - shown
        ));
    }
}

/// The overview: running and queued jobs, then the most recent finished ones,
/// each bounded; only `pool`'s when given.
pub(crate) fn overview(listing: &JobListing, pool: Option<&str>, now: OffsetDateTime) -> String {
    let jobs: Vec<&JobSummary> = listing
        .jobs
        .iter()
        .filter(|s| pool.is_none_or(|p| s.pool_id == p))
        .collect();
    let (mut active, mut finished): (Vec<&JobSummary>, Vec<&JobSummary>) =
        jobs.iter().partition(|s| !s.state.is_terminal());
    active.sort_by_key(|s| {
        (
            s.state != JobState::Running,
            std::cmp::Reverse(s.created_at),
        )
    });
    finished.sort_by_key(|s| std::cmp::Reverse(s.updated_at));
    let mut body = String::new();
    if let Some(p) = pool {
        body.push_str(&format!(
            "<h2>Jobs of pool {} <a class=\"muted\" href=\"/\">(all jobs)</a></h2>",
            escape(p)
        ));
    }
    jobs_section(
        &mut body,
        "Active",
        &active,
        ACTIVE_SHOWN,
        "No job is running or queued.",
        "more",
        now,
    );
    jobs_section(
        &mut body,
        "Recently finished",
        &finished,
        FINISHED_SHOWN,
        "None yet.",
        "older",
        now,
    );
    if !listing.skipped.is_empty() {
        body.push_str(&format!(
            "<p class=\"error\">{} job documents could not be read: {}</p>",
            listing.skipped.len(),
            escape(
                &listing
                    .skipped
                    .iter()
                    .map(|k| k.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        ));
    }
    layout("jobs", now, &body)
}

/// A key that sorts `dst2` before `dst10`.
fn natural(name: &str) -> (String, u64, &str) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_owned(), num.parse().unwrap_or(0), name)
}

fn replica_state(r: &ReplicaRecord) -> String {
    let s = format!("{:?}", r.state).to_lowercase();
    format!("<span class=\"state {s}\">{s}</span>")
}

fn replica_row(r: &ReplicaRecord) -> String {
    let share = if r.bytes_total == 0 {
        if r.state == crate::state::ReplicaState::Verified {
            1.0
        } else {
            0.0
        }
    } else {
        r.bytes_copied as f64 / r.bytes_total as f64
    };
    format!(
        "<tr><td class=\"num\" data-k=\"replica\">{}</td><td>{}</td><td>{}</td><td>{}</td><td data-k=\"method\">{}</td><td data-k=\"copied from\">{}</td><td class=\"num\" data-k=\"attempts\">{}</td><td class=\"err\">{}</td></tr>",
        r.index,
        escape(&r.account),
        replica_state(r),
        bar(share),
        escape(r.method.map_or("–", ReplicaMethod::as_str)),
        escape(r.copied_from.as_deref().unwrap_or("–")),
        r.attempts,
        r.error.as_deref().map_or(String::new(), |e| format!("<span class=\"failed\" title=\"{0}\">{0}</span>", escape(e))),
    )
}

const REPLICA_HEAD: &str = "<div class=\"scroll\"><table class=\"cards\"><tr><th class=\"num\">#</th><th>account</th><th>state</th><th>progress</th>\
<th>method</th><th>copied from</th><th class=\"num\">attempts</th><th>error</th></tr>";

/// One job: its facts and timing, and its replicas (grouped by account, with a
/// summary per account, when there are many).
pub(crate) fn job_page(d: &JobDocument, now: OffsetDateTime) -> String {
    let s = JobSummary::of(d);
    let t = s.timing(now);
    let fact = |k: &str, v: String| format!("<div><b>{k}</b>{v}</div>");
    let mut body = format!(
        "<h2>Job {} <span class=\"muted\">pool <a href=\"/?pool={pool}\">{pool}</a></span></h2><div class=\"facts\">",
        escape(d.job_id.as_str()),
        pool = escape(d.pool_id()),
    );
    body.push_str(&fact(
        "state",
        state_words(s.state, s.phase, s.cancel_requested),
    ));
    body.push_str(&fact("progress", bar(s.progress())));
    body.push_str(&fact(
        "copied",
        format!(
            "{} of {}",
            human_bytes(s.bytes_copied),
            human_bytes(s.bytes_total)
        ),
    ));
    body.push_str(&fact(
        "replicas",
        format!("{} of {} verified", s.verified, s.replicas),
    ));
    body.push_str(&fact("nodes", s.nodes.to_string()));
    let [rate, elapsed, eta] = timing_parts(&t);
    body.push_str(&fact("throughput", rate));
    body.push_str(&fact("elapsed", elapsed));
    body.push_str(&fact("ETA", eta));
    if let Some(src) = d.spec().map(|s| s.source.as_str()) {
        body.push_str(&fact("source", escape(src)));
    }
    body.push_str("</div>");
    if let Some(e) = &d.error {
        body.push_str(&format!("<p class=\"error\">{}</p>", escape(e)));
    }
    if let Some(line) = crate::views::pool_stage_line(d) {
        body.push_str(&format!("<p class=\"pool-stage\">{}</p>", escape(&line)));
    }
    if let (Some(line), Some(g)) = (crate::views::gallery_line(d), &d.gallery) {
        body.push_str(&format!(
            "<p class=\"gallery\">{} {}</p>",
            escape(&line),
            bar(g.progress)
        ));
        if !g.history.is_empty() {
            body.push_str("<ul class=\"muted\">");
            for step in &g.history {
                body.push_str(&format!("<li>{}</li>", escape(step)));
            }
            body.push_str("</ul>");
        }
    }
    body.push_str(&format!(
        "<h2>Replicas <span class=\"muted\">{}</span></h2>",
        d.replicas.len()
    ));
    if d.replicas.len() <= GROUP_ABOVE {
        body.push_str(REPLICA_HEAD);
        for r in &d.replicas {
            body.push_str(&replica_row(r));
        }
        body.push_str("</table></div>");
    } else {
        let mut by: BTreeMap<(String, u64, &str), Vec<&ReplicaRecord>> = BTreeMap::new();
        for r in &d.replicas {
            by.entry(natural(&r.account)).or_default().push(r);
        }
        body.push_str("<div class=\"scroll\"><table><tr><th>account</th><th class=\"num\">verified</th><th class=\"num\">copying</th><th class=\"num\">failed</th><th>progress</th><th class=\"num hide-sm\">copied</th></tr>");
        for ((_, _, account), rs) in &by {
            let count =
                |st: crate::state::ReplicaState| rs.iter().filter(|r| r.state == st).count();
            let total: u64 = rs.iter().map(|r| r.bytes_total).sum();
            let done: u64 = rs.iter().map(|r| r.bytes_copied.min(r.bytes_total)).sum();
            body.push_str(&format!(
                "<tr><td><a href=\"#acct-{a}\">{a}</a></td><td class=\"num\">{} of {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num hide-sm\">{}</td></tr>",
                count(crate::state::ReplicaState::Verified),
                rs.len(),
                count(crate::state::ReplicaState::Copying),
                count(crate::state::ReplicaState::Failed),
                bar(if total == 0 { 0.0 } else { done as f64 / total as f64 }),
                human_bytes(done),
                a = escape(account),
            ));
        }
        body.push_str("</table></div>");
        for ((_, _, account), rs) in &by {
            body.push_str(&format!(
                "<details id=\"acct-{a}\"><summary>{a}: {} replicas</summary>{REPLICA_HEAD}",
                rs.len(),
                a = escape(account)
            ));
            for r in rs {
                body.push_str(&replica_row(r));
            }
            body.push_str("</table></div></details>");
        }
    }
    layout(&format!("job {}", d.job_id.as_str()), now, &body)
}

/// The pools: each one's image sets (source, snapshot, replicas per account,
/// gallery version), linked to its jobs.
pub(crate) fn pools_page(
    pools: &[PoolRecord],
    nodes: &BTreeMap<String, crate::state::PoolNodes>,
    now: OffsetDateTime,
) -> String {
    let mut body = format!(
        "<h2>Pools <span class=\"muted\">{}</span></h2>",
        pools.len()
    );
    if pools.is_empty() {
        body.push_str("<p class=\"muted\">No pool has an image set yet.</p>");
    }
    for p in pools {
        body.push_str(&format!(
            "<h2>{id} <a class=\"muted\" href=\"/?pool={id}\">jobs</a></h2>",
            id = escape(&p.pool_id)
        ));
        if let Some(l) = &p.lock {
            body.push_str(&format!(
                "<p class=\"muted\">held by job <a href=\"/jobs/{j}\">{j}</a>{}</p>",
                if l.retiring { " (retiring)" } else { "" },
                j = escape(&l.job_id)
            ));
        }
        if let Some(n) = nodes.get(&p.pool_id) {
            body.push_str(&format!(
                "<p class=\"nodes\">nodes: target {}, current {}, image capacity {}{}</p>",
                n.target_nodes,
                n.current_nodes,
                n.image_capacity_nodes
                    .map_or("–".to_owned(), |c| c.to_string()),
                n.resize_errors.last().map_or(String::new(), |e| format!(
                    " <span class=\"error\">last resize error: {}</span>",
                    escape(e)
                )),
            ));
        }
        body.push_str("<div class=\"scroll\"><table><tr><th>source</th><th class=\"hide-sm\">snapshot</th><th class=\"num\">size</th><th>replicas per account</th><th>gallery version</th></tr>");
        for set in p.sets.iter().rev() {
            let mut per: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &set.replicas {
                *per.entry(&r.account).or_default() += 1;
            }
            body.push_str(&format!(
                "<tr><td>{}</td><td class=\"hide-sm\">{}</td><td class=\"num\">{}</td><td>{} <span class=\"muted\">({} in all)</span></td><td>{}</td></tr>",
                escape(&set.source),
                escape(&set.source_snapshot),
                human_bytes(set.source_bytes),
                escape(&per.iter().map(|(a, n)| format!("{a}: {n}")).collect::<Vec<_>>().join(", ")),
                set.replicas.len(),
                set.gallery_version.as_ref().map_or("–".to_owned(), |v| format!("{} ({} replicas)", escape(&v.version), v.replicas)),
            ));
        }
        body.push_str("</table></div>");
    }
    layout("pools", now, &body)
}
