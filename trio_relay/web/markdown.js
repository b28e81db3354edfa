// markdown.js: a chat message's text, shown as CommonMark (markdown-it, vendored beside this
// file), without ever letting the text run code.
//
// Three layers keep a message inert:
// 1. markdown-it runs with `html: false`: raw HTML in a message comes out escaped, as text,
//    and its link check refuses `javascript:`, `vbscript:`, `file:` and `data:` URLs;
// 2. its HTML is parsed in an inert <template> (nothing there runs or loads), and
// 3. only an allow-list of elements and attributes is copied from it into new elements made
//    here; links are kept only for http(s) and mailto, and open in a new tab without access
//    to this page (rel="noopener noreferrer").
// The page's Content-Security-Policy (script-src 'self', no inline anything) is the last net.

import markdownit from "./markdown-it.esm.min.mjs";

const md = markdownit({
  html: false, // raw HTML is text
  linkify: true, // bare URLs become links
  breaks: true, // a line break in a chat message is a line break
  typographer: false, // the text as written: no curly quotes
});

// An image would load a URL chosen by whoever wrote the message (the CSP allows only this
// origin's anyway): it is shown as a link to the image instead.
md.renderer.rules.image = (tokens, index) => {
  const token = tokens[index];
  const src = md.utils.escapeHtml(token.attrGet("src") ?? "");
  const alt = md.utils.escapeHtml(token.content || token.attrGet("src") || "image");
  return `<a href="${src}">${alt}</a>`;
};

// A table column's alignment comes as style="text-align:…", which the page's CSP would
// refuse (no inline styles, even in an inert template): it becomes data-align instead.
md.core.ruler.push("align_without_style", (state) => {
  for (const token of state.tokens) {
    if (token.type !== "th_open" && token.type !== "td_open") continue;
    const style = token.attrGet("style");
    if (style === null) continue;
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    const align = /^text-align:\s*(left|right|center)$/.exec(style);
    if (align) token.attrSet("data-align", align[1]);
  }
});

// Elements copied from markdown-it's output, and the attributes each keeps.
const ALLOWED = new Map([
  ["p", []], ["br", []], ["hr", []],
  ["h1", []], ["h2", []], ["h3", []], ["h4", []], ["h5", []], ["h6", []],
  ["em", []], ["strong", []], ["s", []], ["del", []], ["code", ["class"]], ["pre", []],
  ["blockquote", []], ["ul", []], ["ol", ["start"]], ["li", []],
  ["table", []], ["thead", []], ["tbody", []], ["tr", []], ["th", ["data-align"]], ["td", ["data-align"]],
  ["a", ["href", "title"]],
]);
// Kept whole, but their whitespace-only line breaks between blocks are not content.
const PRESERVE_WHITESPACE = new Set(["pre", "code"]);
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

/** The URL if a link may point there (resolved against the page), else null. */
function safeHref(href) {
  try {
    const url = new URL(href, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

/** Copies `source`'s children into `target`, keeping only what ALLOWED lets through. */
function copyAllowed(source, target, inPre) {
  for (const node of source.childNodes) {
    if (node.nodeType === Node.TEXT_NODE) {
      // markdown-it puts "\n" between blocks and after <br>: layout, not text.
      if (!inPre && /^\n+$/.test(node.data)) continue;
      target.append(document.createTextNode(node.data));
      continue;
    }
    if (node.nodeType !== Node.ELEMENT_NODE) continue;
    const tag = node.localName;
    const attributes = ALLOWED.get(tag);
    if (!attributes) {
      // Not expected from markdown-it with html off; keep its text, drop the element.
      target.append(document.createTextNode(node.textContent ?? ""));
      continue;
    }
    let element = document.createElement(tag);
    for (const name of attributes) {
      const value = node.getAttribute(name);
      if (value === null) continue;
      if (name === "class") {
        // Only a fence's language, as markdown-it writes it.
        const language = /^language-([\w+#.-]{1,40})$/.exec(value);
        if (language) element.dataset.language = language[1];
      } else if (name === "data-align") {
        if (/^(left|right|center)$/.test(value)) element.dataset.align = value;
      } else if (name === "start") {
        const start = Number.parseInt(value, 10);
        if (Number.isFinite(start)) element.setAttribute("start", String(start));
      } else if (name === "href") {
        const href = safeHref(value);
        if (href) {
          element.setAttribute("href", href);
          element.setAttribute("target", "_blank");
          element.setAttribute("rel", "noopener noreferrer");
        }
      } else {
        element.setAttribute(name, value);
      }
    }
    if (tag === "a" && !element.hasAttribute("href")) {
      element = document.createElement("span"); // a link to nowhere safe: its text only
    }
    copyAllowed(node, element, inPre || PRESERVE_WHITESPACE.has(tag));
    target.append(decorate(tag, element));
  }
}

/** Wraps what needs a frame: code blocks get a copy button, tables their own scrollbar. */
function decorate(tag, element) {
  if (tag === "pre") {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "code__copy";
    copy.dataset.testid = "copy-code";
    // Labels are CSS content (not text), so a message's text stays what was written.
    copy.setAttribute("aria-label", "Copy code");
    copy.title = "Copy code";
    const bar = document.createElement("div");
    bar.className = "code__bar";
    const language = element.querySelector("code")?.dataset.language;
    if (language) bar.dataset.language = language;
    bar.append(copy);
    const frame = document.createElement("div");
    frame.className = "code";
    frame.append(bar, element);
    return frame;
  }
  if (tag === "table") {
    const frame = document.createElement("div");
    frame.className = "table-scroll";
    frame.append(element);
    return frame;
  }
  return element;
}

/** Replaces `target`'s children with `text` rendered as markdown. */
export function renderMarkdown(target, text) {
  const template = document.createElement("template");
  // An inert document fragment: nothing in it runs, loads or is connected to the page.
  template.innerHTML = md.render(text);
  const fragment = document.createDocumentFragment();
  copyAllowed(template.content, fragment, false);
  target.replaceChildren(fragment);
}

/** Copies a code block's text; falls back to a selection where the Clipboard API is off
 * (pages served over plain http from another machine are not a secure context). */
export async function copyCode(button) {
  const code = button.closest(".code")?.querySelector("pre");
  if (!code) return false;
  const text = code.textContent ?? "";
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    area.remove();
    if (!copied) {
      // Copying is refused here: select the code, for the user's own Ctrl+C.
      const range = document.createRange();
      range.selectNodeContents(code);
      window.getSelection()?.removeAllRanges();
      window.getSelection()?.addRange(range);
    }
    return copied;
  }
}
