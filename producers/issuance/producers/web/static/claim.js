// The activity page's claim form: posts JSON to /api/claims, then polls the
// claim's status until its coupons are credited (or a worker refuses it).
"use strict";

(function () {
  const main = document.querySelector("main.envelope");
  const form = document.getElementById("claim-form");
  if (!main || !form) {
    return;
  }
  const phone = document.getElementById("phone");
  const button = document.getElementById("claim");
  const message = document.getElementById("message");
  const coupons = document.getElementById("coupons");
  const POLL_MS = 1000;
  const POLL_TRIES = 30;
  let claimId = null; // kept across "busy" answers so a retry is the same claim

  function newClaimId() {
    return window.crypto && window.crypto.randomUUID ? window.crypto.randomUUID() : null;
  }

  function show(text, state) {
    message.textContent = text;
    message.dataset.state = state;
  }

  function showCoupons(list) {
    coupons.replaceChildren();
    for (const coupon of list) {
      const item = document.createElement("li");
      item.className = "coupon";
      item.textContent = coupon.code;
      coupons.appendChild(item);
    }
  }

  async function poll(id) {
    for (let i = 0; i < POLL_TRIES; i += 1) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      let answer;
      try {
        const response = await fetch("/api/claims/" + encodeURIComponent(id), {
          headers: { Accept: "application/json" },
        });
        if (!response.ok) {
          continue;
        }
        answer = await response.json();
      } catch (error) {
        continue;
      }
      if (answer.status === "credited") {
        show(answer.message, "credited");
        showCoupons(answer.coupons || []);
        return;
      }
      if (answer.status === "refused") {
        show(answer.message, "refused");
        return;
      }
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    coupons.replaceChildren();
    claimId = claimId || newClaimId();
    const body = { activity: main.dataset.activity, phone: phone.value.trim() };
    if (main.dataset.share) {
      body.share_id = main.dataset.share;
    }
    if (claimId) {
      body.claim_id = claimId;
    }
    try {
      const response = await fetch("/api/claims", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      show(answer.message, answer.status);
      if (answer.status !== "busy") {
        claimId = null;
      }
      if (answer.status === "accepted") {
        poll(answer.claim_id);
      }
    } catch (error) {
      show("busy, try again", "busy");
    } finally {
      button.disabled = false;
    }
  });
})();
