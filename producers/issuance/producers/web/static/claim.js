// The activity page's claim form: posts JSON to /api/claims, then polls the
// claim's status until its coupons are credited (or a worker refuses it).
// Every sentence comes from the page's #texts block (in the page's language),
// chosen by the status and reason codes the API answers with.
"use strict";

(function () {
  const main = document.querySelector("main.envelope");
  const form = document.getElementById("claim-form");
  const textsBlock = document.getElementById("texts");
  if (!main || !form || !textsBlock) {
    return;
  }
  const TEXTS = JSON.parse(textsBlock.textContent);
  const phone = document.getElementById("phone");
  const button = document.getElementById("claim");
  const message = document.getElementById("message");
  const actions = document.getElementById("actions");
  const result = document.getElementById("result");
  const resultHeading = document.getElementById("result-heading");
  const resultText = document.getElementById("result-text");
  const resultActions = document.getElementById("result-actions");
  const coupons = document.getElementById("coupons");
  const packagePreview = document.getElementById("package");
  const appUrl = main.dataset.appUrl || "";
  const timeZone = main.dataset.timezone || "Asia/Shanghai";
  const POLL_MS = 1000;
  const POLL_TRIES = 30;
  // What a member may do next, after each answer (shown when the app's URL is set).
  const NEXT = {
    "reason.similar_activity": "action.download",
    "reason.already_received": "action.view",
    "status.accepted": "action.use",
    "status.bound": "action.use",
    "status.credited": "action.use",
    "status.held": "action.register",
  };

  function text(key, values) {
    let sentence = TEXTS[key] || TEXTS["status.invalid"];
    for (const [name, value] of Object.entries(values || {})) {
      sentence = sentence.split("{" + name + "}").join(String(value));
    }
    return sentence;
  }

  // The key of an answer's sentence: its reason when refused, else its status.
  function keyOf(answer) {
    if (answer.status === "refused" && ("reason." + answer.reason) in TEXTS) {
      return "reason." + answer.reason;
    }
    if (answer.status === "bound" && answer.held) {
      return "status.held";
    }
    return "status." + answer.status;
  }

  function actionLink(key, primary) {
    const link = document.createElement("a");
    link.className = primary ? "button" : "button secondary";
    link.href = appUrl;
    link.textContent = text(key);
    return link;
  }

  // After a refusal the next step is secondary to the claim button; after
  // a claim it is the page's main action.
  function showActions(place, key) {
    place.replaceChildren();
    const action = NEXT[key];
    if (appUrl && action) {
      place.appendChild(actionLink(action, !key.startsWith("reason.")));
    }
  }

  function showMessage(key, state, sentence) {
    message.textContent = sentence || text(key);
    message.dataset.state = state;
    showActions(actions, key);
  }

  function money(cents) {
    return (cents / 100).toFixed(2).replace(/\.?0+$/, "");
  }

  // The same words as the server-rendered package cards (page.py, coupon_face).
  function face(coupon) {
    const threshold = money(coupon.threshold_cents);
    let condition = coupon.threshold_cents ? text("spend", { threshold: threshold }) : "";
    let value;
    let title = coupon.title;
    if (coupon.kind === "discount_rate") {
      const tenths = ((10000 - coupon.value) / 1000).toFixed(2).replace(/\.?0+$/, "");
      value = text("percent", { percent: money(coupon.value), tenths: tenths });
      title = title || text("coupon");
    } else if (coupon.kind === "gift") {
      value = text("gift");
      title = title || text("gift");
    } else {
      value = text("amount", { amount: money(coupon.value) });
      title = title || (coupon.threshold_cents
        ? text("spend_save", { threshold: threshold, amount: money(coupon.value) })
        : text("coupon"));
    }
    if (!condition && coupon.kind !== "gift") {
      condition = text("no_minimum");
    }
    return { value: value, condition: condition, title: title };
  }

  // Coupons expire at 24:00 of their last day in the activity's zone (stored
  // as the next midnight): show that day, as "YYYY-MM-DD 23:59".
  function localTime(instant) {
    const parts = {};
    const format = new Intl.DateTimeFormat("en-CA", {
      timeZone: timeZone, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", hourCycle: "h23",
    });
    for (const part of format.formatToParts(instant)) {
      parts[part.type] = part.value;
    }
    return parts.year + "-" + parts.month + "-" + parts.day + " " + parts.hour + ":" + parts.minute;
  }

  function expiry(iso) {
    if (!iso) {
      return "";
    }
    let instant = new Date(iso);
    if (localTime(instant).endsWith(" 00:00")) {
      instant = new Date(instant.getTime() - 60 * 1000);
    }
    return text("valid_until", { date: localTime(instant) });
  }

  function element(tag, className, content) {
    const node = document.createElement(tag);
    node.className = className;
    if (content !== undefined) {
      node.textContent = content;
    }
    return node;
  }

  function showCoupons(list) {
    coupons.replaceChildren();
    for (const coupon of list) {
      const card = face(coupon);
      const item = element("li", "coupon");
      const value = element("div", "coupon-value");
      value.append(element("span", "amount", card.value), element("span", "condition", card.condition));
      const body = element("div", "coupon-body");
      body.append(element("p", "coupon-title", card.title), element("p", "coupon-expiry", expiry(coupon.expires_at)));
      const code = element("p", "coupon-code");
      code.append(element("span", "code-label", text("code") + " "), element("span", "code", coupon.code));
      body.appendChild(code);
      item.append(value, body);
      coupons.appendChild(item);
    }
  }

  // The success view: the form gives way to the result, which takes focus.
  function showResult(key) {
    form.hidden = true;
    packagePreview.hidden = true;
    message.textContent = "";
    actions.replaceChildren();
    const first = result.hidden;
    result.hidden = false;
    resultText.textContent = text(key);
    resultText.dataset.state = key;
    showActions(resultActions, key);
    if (first) {
      resultHeading.focus();
    }
  }

  function showRefusal(key) {
    form.hidden = false;
    packagePreview.hidden = false;
    result.hidden = true;
    showMessage(key, "refused");
  }

  async function poll(id, token) {
    for (let i = 0; i < POLL_TRIES; i += 1) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      let answer;
      try {
        const response = await fetch("/api/claims/" + encodeURIComponent(id), {
          headers: { Accept: "application/json", "X-Claim-Token": token },
        });
        if (!response.ok) {
          continue;
        }
        answer = await response.json();
      } catch (error) {
        continue;
      }
      const key = keyOf(answer);
      if (answer.status === "credited") {
        showResult(key);
        showCoupons(answer.coupons || []);
        return;
      }
      if (answer.status === "refused") {
        showRefusal(key);
        return;
      }
      if (key === "status.held") {
        showResult(key);
        return;
      }
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    button.textContent = text("claiming");
    message.textContent = "";
    message.dataset.state = "";
    actions.replaceChildren();
    phone.removeAttribute("aria-invalid");
    coupons.replaceChildren();
    const body = { activity: main.dataset.activity, phone: phone.value.trim() };
    if (main.dataset.share) {
      body.share_id = main.dataset.share;
    }
    // A link handed out in a chat group or by a partner names its channel.
    const channel = new URLSearchParams(window.location.search).get("channel");
    if (channel) {
      body.channel = channel;
    }
    // No claim ID: the server makes one and answers it with the token that
    // alone lets this page read the claim's status.
    try {
      const response = await fetch("/api/claims", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      const key = keyOf(answer);
      if (answer.status === "accepted") {
        showResult(key);
        poll(answer.claim_id, answer.status_token);
      } else {
        // A reason this page has no words for (a region, a challenge): the server's.
        showMessage(key, answer.status, key in TEXTS ? null : answer.message);
        if (answer.reason === "bad_phone") {
          phone.setAttribute("aria-invalid", "true");
          phone.focus();
        }
      }
    } catch (error) {
      showMessage("status.busy", "busy");
    } finally {
      button.disabled = false;
      button.textContent = text("claim");
    }
  });
})();
