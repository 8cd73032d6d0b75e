// Model output as Markdown (GFM tables, highlighted code). Raw HTML in the text is never
// rendered as HTML: react-markdown shows it as text, and unsafe link targets are dropped.
import { memo, useRef, type ComponentPropsWithoutRef } from "react";
import ReactMarkdown from "react-markdown";
import rehypeHighlight from "rehype-highlight";
import remarkGfm from "remark-gfm";
import { CopyButton } from "./CopyButton";

function CodeBlock(props: ComponentPropsWithoutRef<"pre">) {
  const ref = useRef<HTMLPreElement>(null);
  return (
    <div className="code-block">
      <CopyButton text={() => ref.current?.innerText ?? ""} label="Copy code" />
      <pre ref={ref} {...props} />
    </div>
  );
}

function Link(props: ComponentPropsWithoutRef<"a">) {
  return <a {...props} target="_blank" rel="noopener noreferrer nofollow" />;
}

export const Markdown = memo(function Markdown({ text }: { text: string }) {
  return (
    <div className="markdown">
      <ReactMarkdown
        remarkPlugins={[remarkGfm]}
        rehypePlugins={[[rehypeHighlight, { detect: false, ignoreMissing: true }]]}
        skipHtml={false}
        components={{ pre: CodeBlock, a: Link }}
      >
        {text}
      </ReactMarkdown>
    </div>
  );
});
