// The admin page's only script: elements with data-refresh="URL" have their content replaced
// by the HTML the URL answers, every two seconds (the live event tail, export progress).
// Everything works without it; it only saves pressing reload.
(function () {
  const every = 2000;
  document.querySelectorAll("[data-refresh]").forEach(function (el) {
    const url = el.getAttribute("data-refresh");
    setInterval(function () {
      fetch(url, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { el.innerHTML = html; } })
        .catch(function () {});
    }, every);
  });
})();
