// Two small enhancements; every page works without them.
"use strict";

// The progress of a code generation job, polled until it is finished.
function pollJob(box) {
  const bar = document.getElementById("job-bar");
  const status = document.getElementById("job-status");
  const exportBox = document.getElementById("job-export");
  const link = document.getElementById("job-export-link");
  const tick = async () => {
    const answer = await fetch(box.dataset.progressUrl, { headers: { accept: "application/json" } });
    if (!answer.ok) return;
    const job = await answer.json();
    bar.value = job.percent;
    bar.textContent = job.percent + "%";
    if (job.error) {
      status.textContent = "Failed: " + job.error;
    } else if (job.finished) {
      status.textContent = "Done: batch " + job.batch + " holds " + job.count + " codes.";
      link.href = "/batches/" + job.batch + ".csv";
      exportBox.hidden = false;
    } else {
      status.textContent = job.done + " of " + job.count + " codes…";
      setTimeout(tick, 500);
    }
  };
  tick();
}

// The banner preview follows the URL, title and copy as they are typed.
function livePreview() {
  const image = document.getElementById("banner-preview");
  const pairs = [["title", "preview-title"], ["copy", "preview-copy"]];
  const url = document.getElementById("banner_url");
  url.addEventListener("input", () => {
    const value = url.value.trim();
    image.hidden = !value;
    if (value) image.src = value;
  });
  for (const [field, target] of pairs) {
    const input = document.getElementById(field);
    input.addEventListener("input", () => {
      document.getElementById(target).textContent = input.value;
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job) pollJob(job);
  if (document.getElementById("banner-preview")) livePreview();
});
